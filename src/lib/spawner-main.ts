// The spawner's process (see spawner.ts): runs each requested tool with exec.ts's own run() and
// sends the result back. Ends when berthd does (its IPC channel closes).
import { runHere } from './exec.js';
import type { SpawnReply, SpawnRequest } from './spawner.js';

const reply = (m: SpawnReply) => process.send?.(m);
process.on('message', (m: SpawnRequest) => {
  runHere(m.file, m.args, m.opts).then(
    (result) => reply({ id: m.id, result }),
    (e: NodeJS.ErrnoException) => reply({ id: m.id, error: e.message, ...(e.code ? { code: e.code } : {}) }),
  );
});
process.on('disconnect', () => process.exit(0));
