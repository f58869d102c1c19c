// The spawner's process (see spawner.ts): runs each requested tool with exec.ts's own run(), or
// starts a long-lived process with startDetached(), and sends the result back (and, for a started
// process, its end). Ends when berthd does (its IPC channel closes).
import { runHere, startDetachedHere } from './exec.js';
import type { SpawnReply, SpawnRequest } from './spawner.js';

const reply = (m: SpawnReply) => process.send?.(m);
const failed = (id: number) => (e: NodeJS.ErrnoException) => reply({ id, error: e.message, ...(e.code ? { code: e.code } : {}) });
process.on('message', (m: SpawnRequest) => {
  if ('start' in m) {
    startDetachedHere(m.file, m.args, m.start).then((s) => {
      reply({ id: m.id, pid: s.pid });
      void s.exited.then((why) => reply({ exited: s.pid, why }));
    }, failed(m.id));
    return;
  }
  runHere(m.file, m.args, m.opts).then((result) => reply({ id: m.id, result }), failed(m.id));
});
process.on('disconnect', () => process.exit(0));
