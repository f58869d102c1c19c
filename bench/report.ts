// Writes one benchmark's section into BENCHMARKS.md, replacing the previous result of the same
// benchmark and keeping the others.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';

export function updateBenchmarks(file: string, key: string, title: string, command: string, body: string): void {
  const begin = `<!-- bench:${key}:begin -->`;
  const end = `<!-- bench:${key}:end -->`;
  const section = `${begin}\n## ${title}\n\nReproduce (as root, after \`bash scripts/test.sh\` or \`bash scripts/setup.sh\` built the tree):\n\n    ${command}\n\n${body}\n${end}`;
  let text = existsSync(file)
    ? readFileSync(file, 'utf8')
    : '# Benchmarks\n\nEvery figure is a ratio against a baseline measured in the same run on the same host, or a\nmeasurement with its command. These machines are noisy: compare ratios, not absolute numbers.\n';
  const re = new RegExp(`${begin}[\\s\\S]*?${end}`);
  text = re.test(text) ? text.replace(re, section) : `${text.trimEnd()}\n\n${section}\n`;
  writeFileSync(file, text);
}
