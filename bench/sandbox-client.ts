// What the sandbox benchmarks do as a client (bench/sandboxes.ts, bench/sandbox-idle.ts).
import type { TestDaemon } from '../test/harness.js';

/** POST a command and resolve when its first stdout event arrives (the stream is then dropped). */
export async function firstByte(d: TestDaemon, name: string): Promise<void> {
  const ac = new AbortController();
  const res = await fetch(`${d.addr}/v1/projects/default/sandboxes/${name}/commands`, {
    method: 'POST',
    headers: { authorization: `Bearer ${d.token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ cmd: ['echo', 'ready'] }),
    signal: ac.signal,
  });
  if (res.status !== 200 || !res.body) throw new Error(`command in ${name}: ${res.status} ${await res.text()}`);
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`no output from ${name}: ${buf}`);
      buf += dec.decode(value, { stream: true });
      if (/"type":"stdout"/.test(buf)) return;
    }
  } finally {
    ac.abort();
  }
}
