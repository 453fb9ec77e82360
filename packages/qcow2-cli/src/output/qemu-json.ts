/**
 * JSON laid out as QEMU prints it, so that our output diffs cleanly against qemu-img's.
 *
 * QEMU builds its JSON from a hash table of 512 buckets: keys come out in bucket order (the bucket
 * is a small string hash of the key), not in insertion order. Reproducing that order makes
 * `qcow2 info --output=json` byte-identical to `qemu-img info --output=json` for the same fields.
 * Pretty output indents by 4 spaces; strings escape non-ASCII as `\uXXXX` (upper-case hex).
 */

/** Any JSON value; `undefined` members of objects are left out. */
export type JsonValue = string | number | boolean | null | readonly JsonValue[] | JsonObject;
export interface JsonObject {
  readonly [key: string]: JsonValue | undefined;
}

const BUCKETS = 512;

/** QEMU's QDict bucket of a key (the hash QDict uses, reduced to its table size). */
export function qdictBucket(key: string): number {
  const bytes = new TextEncoder().encode(key);
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) {
    value = (value + ((bytes[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  }
  return ((Math.imul(1103515243, value) + 12345) >>> 0) % BUCKETS;
}

/** Keys in the order QEMU iterates them: by bucket, and newest first inside a bucket. */
export function qdictKeyOrder(keys: readonly string[]): string[] {
  return keys
    .map((key, index) => ({ key, index, bucket: qdictBucket(key) }))
    .sort((a, b) => a.bucket - b.bucket || b.index - a.index)
    .map((entry) => entry.key);
}

/** A JSON string literal as QEMU writes it. */
export function qemuJsonString(text: string): string {
  let out = '"';
  for (const char of text) {
    const code = char.codePointAt(0)!;
    switch (char) {
      case '"':
        out += '\\"';
        break;
      case '\\':
        out += '\\\\';
        break;
      case '\b':
        out += '\\b';
        break;
      case '\f':
        out += '\\f';
        break;
      case '\n':
        out += '\\n';
        break;
      case '\r':
        out += '\\r';
        break;
      case '\t':
        out += '\\t';
        break;
      default:
        if (code >= 0x20 && code < 0x7f) {
          out += char;
        } else if (code > 0xffff) {
          const high = 0xd800 + ((code - 0x10000) >> 10);
          const low = 0xdc00 + ((code - 0x10000) & 0x3ff);
          out += `\\u${hex4(high)}\\u${hex4(low)}`;
        } else {
          out += `\\u${hex4(code)}`;
        }
    }
  }
  return `${out}"`;
}

function hex4(code: number): string {
  return code.toString(16).toUpperCase().padStart(4, '0');
}

/** `value` as QEMU's pretty-printed JSON (4-space indent), without a trailing newline. */
export function toQemuJson(value: JsonValue, depth = 0): string {
  if (value === null) return 'null';
  if (typeof value === 'string') return qemuJsonString(value);
  if (typeof value === 'number' || typeof value === 'boolean') return String(value);
  const inner = ' '.repeat(4 * (depth + 1));
  const outer = ' '.repeat(4 * depth);
  if (isArray(value)) {
    const items = value.map((item) => `${inner}${toQemuJson(item, depth + 1)}`);
    return items.length === 0 ? `[\n${outer}]` : `[\n${items.join(',\n')}\n${outer}]`;
  }
  const keys = qdictKeyOrder(Object.keys(value).filter((key) => value[key] !== undefined));
  const members = keys.map(
    (key) => `${inner}${qemuJsonString(key)}: ${toQemuJson(value[key] as JsonValue, depth + 1)}`,
  );
  return members.length === 0 ? `{\n${outer}}` : `{\n${members.join(',\n')}\n${outer}}`;
}

function isArray(value: JsonValue): value is readonly JsonValue[] {
  return Array.isArray(value);
}
