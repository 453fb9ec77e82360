/** Which snapshot `-l` / `-s` name: an id or a name given alone is looked up as qemu-img does (id
 * first). */
import { type ImageFormat, type OpenedImage, openImage } from '../engine.js';
import { resolveAgainst } from '../paths.js';

interface SnapshotSelection {
  readonly snapshot?: { id?: string; name?: string; idOrName?: string } | undefined;
  readonly format?: ImageFormat | undefined;
  readonly forceShare?: boolean;
}

/** Opens the source image `source` (relative to `cwd`) read-only at the snapshot `-l`/`-s` name. */
export async function openAtSnapshot(
  cwd: string,
  source: string,
  options: SnapshotSelection,
): Promise<OpenedImage> {
  const sourcePath = resolveAgainst(cwd, source);
  return openImage(sourcePath, {
    displayName: source,
    format: options.format,
    forceShare: options.forceShare,
    snapshot: await selectSnapshot(sourcePath, source, options),
  });
}

export async function selectSnapshot(
  path: string,
  displayName: string,
  options: SnapshotSelection,
): Promise<{ id?: string; name?: string } | undefined> {
  const wanted = options.snapshot;
  if (wanted === undefined) return undefined;
  if (wanted.idOrName === undefined) return wanted;
  const probe = await openImage(path, {
    displayName,
    format: options.format,
    forceShare: options.forceShare === true,
    openBacking: false,
  });
  try {
    const snapshots = probe.image?.snapshots ?? [];
    return snapshots.some((snapshot) => snapshot.id === wanted.idOrName)
      ? { id: wanted.idOrName }
      : { name: wanted.idOrName };
  } finally {
    await probe.close();
  }
}
