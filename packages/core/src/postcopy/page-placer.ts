/**
 * Pages that arrive after LISTEN go into guest RAM through the received map
 * (missing-pages.ts, rule 1). One per placing thread: the main channel's load thread and
 * the preempt channel's thread each have theirs, over the same shared map and RAM.
 */
import type { GuestRam, RamBlock } from '../ram/ram-block.js';
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import type { MissingPagesPlacer } from './missing-pages.js';

/** What a RAM loader needs for postcopy (RamLoadOptions.postcopy). */
export interface PostcopyPlacing {
  /** True once pages must go through the received map (after LISTEN). */
  readonly placing: boolean;
  /** A page that arrived after LISTEN. `data` null: a zero page. */
  placePage(block: RamBlock, offset: number, data: Uint8Array | null): void;
}

export class RamPagePlacer implements PostcopyPlacing {
  readonly placing = true;
  private readonly blockBase = new Map<RamBlock, number>();

  constructor(
    ram: GuestRam,
    readonly placer: MissingPagesPlacer,
  ) {
    let base = 0;
    for (const b of ram.blocks) {
      this.blockBase.set(b, base);
      base += b.pages;
    }
  }

  placePage(block: RamBlock, offset: number, data: Uint8Array | null): void {
    const page = this.blockBase.get(block)! + offset / TARGET_PAGE_SIZE;
    this.placer.place(page, () => {
      if (data) block.writePage(offset / TARGET_PAGE_SIZE, data);
      else block.fillPage(offset / TARGET_PAGE_SIZE, 0);
    });
  }
}
