// A minimal QMP (QEMU Machine Protocol) client: one short connection per command. QMP is JSON
// objects separated by newlines: a greeting, then qmp_capabilities, then commands, each answered by
// {"return": …} or {"error": …}; asynchronous {"event": …} lines are skipped.
import { connect } from 'node:net';

export async function qmp(socketPath: string, command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const sock = connect(socketPath);
    let buf = '';
    let step = 0; // 0: greeting, 1: capabilities answered, 2: command answered
    const timer = setTimeout(() => finish(new Error(`QMP ${command} did not answer within ${timeoutMs} ms`)), timeoutMs);
    const finish = (err: Error | null, value?: unknown) => {
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(value);
    };
    sock.on('error', (e) => finish(e));
    sock.on('data', (d: Buffer) => {
      buf += d.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        let msg: { QMP?: unknown; return?: unknown; error?: { class?: string; desc?: string }; event?: string };
        try {
          msg = JSON.parse(line);
        } catch {
          continue;
        }
        if (msg.event) continue;
        if (msg.error) return finish(new Error(`QMP ${command}: ${msg.error.desc ?? msg.error.class ?? 'error'}`));
        if (step === 0 && msg.QMP) {
          step = 1;
          sock.write(JSON.stringify({ execute: 'qmp_capabilities' }) + '\n');
        } else if (step === 1 && 'return' in msg) {
          step = 2;
          sock.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) }) + '\n');
        } else if (step === 2 && 'return' in msg) {
          return finish(null, msg.return);
        }
      }
    });
  });
}
