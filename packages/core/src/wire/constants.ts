/**
 * QEMU's migration stream constants (migration/savevm.c, migration/ram.c,
 * migration/migration.h). Names are QEMU's so a reader of QEMU finds them.
 */
export const QEMU_VM_FILE_MAGIC = 0x5145564d; // "QEVM"
export const QEMU_VM_FILE_VERSION = 3;

export const QEMU_VM_EOF = 0x00;
export const QEMU_VM_SECTION_START = 0x01;
export const QEMU_VM_SECTION_PART = 0x02;
export const QEMU_VM_SECTION_END = 0x03;
export const QEMU_VM_SECTION_FULL = 0x04;
export const QEMU_VM_SUBSECTION = 0x05;
export const QEMU_VM_VMDESCRIPTION = 0x06;
export const QEMU_VM_CONFIGURATION = 0x07;
export const QEMU_VM_COMMAND = 0x08;
export const QEMU_VM_SECTION_FOOTER = 0x7e;

/** MIG_CMD_* (savevm.c). */
export const MIG_CMD_OPEN_RETURN_PATH = 1;
export const MIG_CMD_PING = 2;
export const MIG_CMD_POSTCOPY_ADVISE = 3;
export const MIG_CMD_POSTCOPY_LISTEN = 4;
export const MIG_CMD_POSTCOPY_RUN = 5;
export const MIG_CMD_POSTCOPY_RAM_DISCARD = 6;
export const MIG_CMD_PACKAGED = 7;
export const MIG_CMD_POSTCOPY_RESUME = 9;
export const MIG_CMD_RECV_BITMAP = 10;

/** RAM_SAVE_FLAG_* (ram.c), in the low bits of each record's be64 address word. */
export const RAM_SAVE_FLAG_ZERO = 0x02;
export const RAM_SAVE_FLAG_MEM_SIZE = 0x04;
export const RAM_SAVE_FLAG_PAGE = 0x08;
export const RAM_SAVE_FLAG_EOS = 0x10;
export const RAM_SAVE_FLAG_CONTINUE = 0x20;
export const RAM_SAVE_FLAG_XBZRLE = 0x40;
export const RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200;
/** Every flag bit fits below the page offset (TARGET_PAGE_BITS = 12). */
export const RAM_SAVE_FLAG_MASK = 0xfff;

/** The RAM section as QEMU registers it: "ram", instance 0, version 4. */
export const RAM_SECTION_IDSTR = 'ram';
export const RAM_SECTION_VERSION = 4;

/** Return-path message types (MIG_RP_MSG_*, migration.c). */
export const MIG_RP_MSG_SHUT = 1;
export const MIG_RP_MSG_PONG = 2;
export const MIG_RP_MSG_REQ_PAGES_ID = 3;
export const MIG_RP_MSG_REQ_PAGES = 4;
export const MIG_RP_MSG_RECV_BITMAP = 5;
export const MIG_RP_MSG_RESUME_ACK = 6;

/** Limits the decoder enforces on lengths it reads from the wire. */
export const MAX_COMMAND_LEN = 1 << 20;
export const MAX_RAM_BLOCKS = 4096;
export const MAX_VMDESC_LEN = 16 << 20;
/** MIG_CMD_PACKAGED's blob is at most this long (savevm.c MAX_VM_CMD_PACKAGED_SIZE). */
export const MAX_VM_CMD_PACKAGED_SIZE = 1 << 24;
/** POSTCOPY_RAM_DISCARD: version byte, and ranges per command (savevm.c, ram.c). */
export const POSTCOPY_RAM_DISCARD_VERSION = 0;
export const MAX_DISCARDS_PER_COMMAND = 12;
