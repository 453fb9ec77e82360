/**
 * `-o help` (or `-o ?`) of create, convert and amend: the options a format takes, listed as
 * qemu-img lists them (`  key=<type>  - what it does`), instead of doing anything. Only the options
 * this CLI accepts are listed (qemu-img also lists encryption and protocol options it has and we
 * do not).
 */

interface OptionDoc {
  readonly key: string;
  readonly type: string;
  readonly text: string;
}

const SIZE: OptionDoc = {
  key: 'size',
  type: 'size',
  text: 'Guest size (bytes, or with a k, M, G, T, P or E suffix)',
};
const PREALLOCATION: OptionDoc = {
  key: 'preallocation',
  type: 'str',
  text: 'What is allocated up front (off, metadata, falloc, full)',
};

const QCOW2_CREATE: readonly OptionDoc[] = [
  { key: 'backing_file', type: 'str', text: 'The backing file the image reads through to' },
  { key: 'backing_fmt', type: 'str', text: 'The format of the backing file' },
  { key: 'cluster_size', type: 'size', text: 'Cluster size, a power of two from 512 to 2M' },
  { key: 'compat', type: 'str', text: 'Format version: 0.10 (v2) or 1.1 (v3)' },
  { key: 'compression_type', type: 'str', text: 'How compressed clusters are compressed (zlib or zstd)' },
  { key: 'data_file', type: 'str', text: 'An external file holding the guest data' },
  { key: 'data_file_raw', type: 'bool (on/off)', text: 'Keep the external data file a valid raw image' },
  { key: 'extended_l2', type: 'bool (on/off)', text: 'Extended L2 entries (32 subclusters per cluster)' },
  { key: 'lazy_refcounts', type: 'bool (on/off)', text: 'Delay refcount updates until the image is closed' },
  PREALLOCATION,
  { key: 'refcount_bits', type: 'num', text: 'Refcount width in bits (1, 2, 4, 8, 16, 32 or 64)' },
  SIZE,
];

/** raw's own option; preallocation belongs to the file it creates (listed with a file named). */
const RAW_CREATE: readonly OptionDoc[] = [SIZE];
const RAW_FILE_CREATE: readonly OptionDoc[] = [PREALLOCATION, SIZE];

/**
 * The `key=value` items of `-o` strings, in order (`,,` is a literal comma, as in QEMU; an item
 * without `=` has the value ''). Lives here, with no import, as the fast paths ask it too.
 */
export function optionItems(list: readonly string[]): { key: string; value: string }[] {
  const items: { key: string; value: string }[] = [];
  for (const text of list) {
    for (const item of text.replaceAll(',,', '\u0000').split(',')) {
      if (item === '') continue;
      const equals = item.indexOf('=');
      items.push({
        key: equals < 0 ? item : item.slice(0, equals),
        value: (equals < 0 ? '' : item.slice(equals + 1)).replaceAll('\u0000', ','),
      });
    }
  }
  return items;
}

/** True when an `-o` list asks for the option list: an item `help` or `?`. */
export function asksOptionHelp(list: readonly string[] | undefined): boolean {
  return list !== undefined && optionItems(list).some(({ key }) => key === 'help' || key === '?');
}

function lines(docs: readonly OptionDoc[]): string {
  return docs.map(({ key, type, text }) => `  ${`${key}=<${type}>`.padEnd(22)} - ${text}\n`).join('');
}

/**
 * What `create -f FORMAT -o help` (and `convert -O FORMAT -o help`) prints. With a file named, the
 * heading is qemu-img's for the options of both the format and the file it would create; without
 * one, it says further options may exist at the file level, as qemu-img does.
 */
export function createOptionHelp(format: string, withFile: boolean): string {
  if (withFile) return `Supported options:\n${lines(format === 'raw' ? RAW_FILE_CREATE : QCOW2_CREATE)}`;
  const docs = format === 'raw' ? RAW_CREATE : QCOW2_CREATE;
  return (
    `Supported ${format} options:\n${lines(docs)}\n` +
    'The protocol level may support further options.\nSpecify the target filename to include those options.\n'
  );
}

/** What `amend -f qcow2 -o help` prints: the options of `keys` (those amend changes). */
export function amendOptionHelp(keys: ReadonlySet<string>): string {
  return `Amend options for 'qcow2':\n${lines(QCOW2_CREATE.filter((doc) => keys.has(doc.key)))}`;
}
