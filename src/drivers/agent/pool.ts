// One shared connection per task to its guest agent (berth-agent), opened on first use and again
// after it breaks. Used by every tier that runs the agent: inside a microVM (virtio-serial, whose
// QEMU socket serves one client at a time) and as PID 1 of a sandbox container (a unix socket).
import { AgentConnection } from './client.js';

export class AgentPool {
  private readonly conns = new Map<string, Promise<AgentConnection>>();

  /** `signal` stops the wait for a socket that does not exist yet (a task destroyed meanwhile). */
  get(id: string, socketPath: string, timeoutMs: number, signal?: AbortSignal): Promise<AgentConnection> {
    const cur = this.conns.get(id);
    if (cur) {
      return cur.then(
        (c) => (c.closed ? this.open(id, socketPath, timeoutMs, signal) : c),
        () => this.open(id, socketPath, timeoutMs, signal),
      );
    }
    return this.open(id, socketPath, timeoutMs, signal);
  }

  /** Makes `conn` (connected some other way) the task's shared connection, replacing any other. */
  adopt(id: string, conn: AgentConnection): void {
    this.drop(id);
    this.track(id, Promise.resolve(conn));
  }

  private open(id: string, socketPath: string, timeoutMs: number, signal?: AbortSignal): Promise<AgentConnection> {
    return this.track(id, AgentConnection.open(socketPath, timeoutMs, signal));
  }

  private track(id: string, p: Promise<AgentConnection>): Promise<AgentConnection> {
    this.conns.set(id, p);
    p.then(
      (c) => c.onClose(() => {
        if (this.conns.get(id) === p) this.conns.delete(id);
      }),
      () => {
        if (this.conns.get(id) === p) this.conns.delete(id);
      },
    );
    return p;
  }

  drop(id: string): void {
    const p = this.conns.get(id);
    this.conns.delete(id);
    p?.then((c) => c.close(), () => undefined);
  }

  closeAll(): void {
    for (const id of [...this.conns.keys()]) this.drop(id);
  }
}
