/**
 * The test guest's own devices, carried in FULL sections as msgpack (core's MsgpackDevice):
 *
 * - `vmig-vcpus`: what the writers were doing (count, writes, pattern), so the destination
 *   can report the guest it received.
 * - `vmig-its`: a device in the style of seed 002's ARM ITS: it keeps a translation table
 *   cached outside guest RAM and flushes it into guest RAM in the completion hook (vCPUs
 *   stopped, final bitmap sync not yet done). Its section says where the table is and which
 *   generation was flushed (the table is derived from it); the destination checks that exactly that table is in its RAM,
 *   which proves the hook's writes travelled in the final pass.
 */
import { type GuestRam, MsgpackDevice, TARGET_PAGE_SIZE } from '@vmig/core';

export interface VcpuState {
  writers: number;
  writes: number;
  pattern: string;
  /** How they write, so that a postcopy destination can run the same vCPUs. */
  dirtyRate?: number;
  hotPages?: number;
  seed?: number;
}

export class VcpuStateDevice extends MsgpackDevice<VcpuState> {
  readonly idstr = 'vmig-vcpus';
  readonly instanceId = 0;
  readonly minimumVersionId = 1;
  /** A postcopy destination learns at setup how many vCPU threads to create. */
  readonly announceAtSetup = true;
  loaded: VcpuState | undefined;
  /** Called after each load (at setup with postcopy, and with the final device state). */
  onLoaded: ((s: VcpuState) => void) | undefined;

  constructor(
    private readonly current: () => VcpuState,
    readonly versionId = 1,
  ) {
    super();
  }

  protected saveState(): VcpuState {
    return this.current();
  }

  protected loadState(s: unknown): void {
    const v = s as Partial<VcpuState> | null;
    if (!v || typeof v.writers !== 'number' || typeof v.writes !== 'number' || typeof v.pattern !== 'string') throw new Error('malformed vCPU state');
    const num = (x: unknown): number | undefined => (typeof x === 'number' && Number.isFinite(x) && x >= 0 ? x : undefined);
    this.loaded = { writers: v.writers, writes: v.writes, pattern: v.pattern, dirtyRate: num(v.dirtyRate), hotPages: num(v.hotPages), seed: num(v.seed) };
    this.onLoaded?.(this.loaded);
  }
}

const ITS_MAGIC = Buffer.from('VMIG-ITS');
const ITS_TABLE_BYTES = 1024;

export interface ItsState {
  block: string;
  offset: number;
  /** The table is a function of its generation (itsTable). */
  generation: number;
}

/** The table a generation produces: magic, generation, then entries derived from it. */
export function itsTable(generation: number): Buffer {
  const t = Buffer.alloc(ITS_TABLE_BYTES);
  ITS_MAGIC.copy(t, 0);
  t.writeUInt32BE(generation >>> 0, 8);
  for (let i = 16; i < ITS_TABLE_BYTES; i += 4) t.writeUInt32BE(Math.imul(generation ^ i, 2654435761) >>> 0, i);
  return t;
}

export class ItsTableDevice extends MsgpackDevice<ItsState> {
  readonly idstr = 'vmig-its';
  readonly instanceId = 0;
  readonly versionId = 1;
  readonly minimumVersionId = 1;
  /** Source: the last flush. Destination: whether RAM holds the table the section names. */
  flushed: ItsState | undefined;
  tableInRam: boolean | undefined;

  /** `ram` is a getter: the destination may create its RAM from the stream. */
  constructor(private readonly ram: () => GuestRam | undefined) {
    super();
  }

  /** Where the table lives: the last page of the last block. */
  private location(): { block: string; offset: number } {
    const ram = this.ram()!;
    const b = ram.blocks[ram.blocks.length - 1]!;
    return { block: b.idstr, offset: b.usedLength - TARGET_PAGE_SIZE };
  }

  flushToRam(): void {
    // A generation nobody could have written before the stop.
    const generation = (Date.now() ^ (process.pid << 8)) >>> 0;
    const table = itsTable(generation);
    const { block, offset } = this.location();
    this.ram()!.find(block)!.writeGuest(offset, table);
    this.flushed = { block, offset, generation };
  }

  protected saveState(): ItsState {
    // Without a flush (no completion yet) there is no table to describe.
    return this.flushed ?? { block: '', offset: 0, generation: 0 };
  }

  protected loadState(s: unknown): void {
    const v = s as Partial<ItsState> | null;
    if (!v || typeof v.block !== 'string' || typeof v.offset !== 'number' || typeof v.generation !== 'number') throw new Error('malformed ITS state');
    this.flushed = { block: v.block, offset: v.offset, generation: v.generation };
    this.checkTableInRam();
  }

  /**
   * Whether RAM holds the table the loaded section names. Precopy: right at load (RAM came
   * first). Postcopy: the section arrives before the table's page, so check again at the end.
   */
  checkTableInRam(): boolean {
    const v = this.flushed;
    const b = v && this.ram()?.find(v.block);
    if (!v || !b || !Number.isInteger(v.offset) || v.offset < 0 || v.offset + ITS_TABLE_BYTES > b.usedLength) {
      this.tableInRam = false;
    } else {
      this.tableInRam = Buffer.compare(b.read(v.offset, ITS_TABLE_BYTES), itsTable(v.generation)) === 0;
    }
    return this.tableInRam;
  }
}
