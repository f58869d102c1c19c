// Output helpers for the berth CLI: aligned tables, JSON, and human-friendly times.

export type OutputFormat = 'table' | 'json';

/** The API's JSON, pretty-printed with 2 spaces. */
export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

/** A cell: missing values show as "-"; newlines are flattened so each row stays one line. */
export function cell(v: unknown): string {
  if (v === undefined || v === null || v === '') return '-';
  if (typeof v === 'boolean') return v ? 'yes' : 'no';
  return String(v).replace(/\s*\n\s*/g, ' ');
}

/** Columns separated by three spaces; the last column is not padded. */
export function renderTable(headers: string[], rows: unknown[][]): string {
  const text = rows.map((r) => headers.map((_, i) => cell(r[i])));
  const widths = headers.map((h, i) => Math.max(h.length, ...text.map((r) => r[i]!.length)));
  const line = (cols: string[]) =>
    cols
      .map((c, i) => (i === cols.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('   ')
      .trimEnd();
  return [line(headers), ...text.map(line)].join('\n') + '\n';
}

export function printTable(headers: string[], rows: unknown[][]): void {
  process.stdout.write(renderTable(headers, rows));
}

function span(ms: number): string {
  const s = Math.floor(Math.abs(ms) / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h`;
  return `${Math.floor(h / 24)}d`;
}

/** Elapsed time since an ISO timestamp ("42s", "5m", "3h", "2d"). */
export function age(iso: string | undefined | null, now = Date.now()): string {
  if (!iso) return '-';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return '-';
  return span(now - t);
}

/** "5m ago" for the past, "in 5m" for the future. */
export function relative(iso: string | undefined | null, now = Date.now()): string {
  if (!iso) return '-';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return '-';
  return t <= now ? `${span(now - t)} ago` : `in ${span(t - now)}`;
}

/** ISO timestamp to the second, UTC ("2026-01-02T03:04:05Z"). */
export function shortTime(iso: string | undefined | null): string {
  if (!iso) return '-';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return iso;
  return new Date(t).toISOString().replace(/\.\d{3}Z$/, 'Z');
}

export function formatLabels(labels: Record<string, string> | undefined): string {
  if (!labels) return '-';
  const s = Object.entries(labels)
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
  return s || '-';
}
