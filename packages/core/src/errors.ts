/**
 * Errors with stable codes (undici style). `code` never changes once published; the
 * message names the channel and phase where they are known.
 */
export type VmigErrorCode =
  | 'VMIG_ERR_INVALID_ARG'
  | 'VMIG_ERR_STREAM_MAGIC'
  | 'VMIG_ERR_STREAM_VERSION'
  | 'VMIG_ERR_STREAM_FORMAT'
  | 'VMIG_ERR_STREAM_TRUNCATED'
  | 'VMIG_ERR_UNKNOWN_BLOCK'
  | 'VMIG_ERR_BLOCK_MISMATCH'
  | 'VMIG_ERR_BAD_OFFSET'
  | 'VMIG_ERR_UNKNOWN_SECTION'
  | 'VMIG_ERR_DEVICE_VERSION'
  | 'VMIG_ERR_DEVICE_STATE'
  | 'VMIG_ERR_CONNECT'
  | 'VMIG_ERR_PEER_CLOSED'
  | 'VMIG_ERR_CHANNEL'
  | 'VMIG_ERR_MULTIFD_HANDSHAKE'
  | 'VMIG_ERR_MULTIFD_PACKET'
  | 'VMIG_ERR_CANCELLED'
  | 'VMIG_ERR_REMOTE'
  | 'VMIG_ERR_WORKER'
  | 'VMIG_ERR_NOTIFIER'
  | 'VMIG_ERR_CONTROL'
  | 'VMIG_ERR_SNAPSHOT_IO'
  | 'VMIG_ERR_POSTCOPY'
  /** A wait on a peer or a thread outlasted --channel-timeout. */
  | 'VMIG_ERR_TIMEOUT'
  /** The two ends disagree on the number of multifd channels. */
  | 'VMIG_ERR_MULTIFD_CHANNELS'
  /** The two ends disagree on how multifd is synced or compressed. */
  | 'VMIG_ERR_MULTIFD_DIALECT'
  /** A stream declares more guest RAM than this side accepts (--max-ram). */
  | 'VMIG_ERR_RAM_LIMIT'
  /** A precopy stream ended with pages that never arrived. */
  | 'VMIG_ERR_PAGES_MISSING'
  /** RAM as loaded differs from what the source sent (the integrity check). */
  | 'VMIG_ERR_INTEGRITY'
  /** The source is a machine type vmig cannot be (only QEMU's -M none carries no device state). */
  | 'VMIG_ERR_MACHINE'
  /** Something vmig did not expect (a bug): the message and the stack on stderr say what. */
  | 'VMIG_ERR_INTERNAL'
  /** A TLS handshake failed: a plaintext peer, a certificate not trusted, a name not allowed. */
  | 'VMIG_ERR_TLS';

export interface VmigErrorContext {
  /** 'main', 'return-path', 'multifd/3', ... */
  channel?: string;
  /** 'setup', 'iterate', 'complete', 'load', ... */
  phase?: string;
}

/** A VmigError as it travels between threads and into reports. */
export interface VmigErrorJSON {
  code: VmigErrorCode;
  message: string;
  channel?: string;
  phase?: string;
}

export class VmigError extends Error {
  readonly code: VmigErrorCode;
  readonly channel: string | undefined;
  readonly phase: string | undefined;

  constructor(code: VmigErrorCode, message: string, ctx: VmigErrorContext = {}, options?: { cause?: unknown }) {
    const where = [ctx.channel && `channel ${ctx.channel}`, ctx.phase && `phase ${ctx.phase}`].filter(Boolean).join(', ');
    super(where ? `${message} (${where})` : message, options);
    this.name = 'VmigError';
    this.code = code;
    this.channel = ctx.channel;
    this.phase = ctx.phase;
  }

  /** The plain object put into reports and sent between processes. */
  toJSON(): VmigErrorJSON {
    return { code: this.code, message: this.message, ...(this.channel ? { channel: this.channel } : {}), ...(this.phase ? { phase: this.phase } : {}) };
  }

  /**
   * An error that crossed a thread or process as toJSON() made it: same code, same message
   * (which already names its channel and phase).
   */
  static fromJSON(j: { code: string; message: string; channel?: string | undefined; phase?: string | undefined }): VmigError {
    const code = (j.code.startsWith('VMIG_ERR_') ? j.code : 'VMIG_ERR_WORKER') as VmigErrorCode;
    const e = new VmigError(code, j.message) as { -readonly [K in keyof VmigError]: VmigError[K] };
    e.channel = j.channel;
    e.phase = j.phase;
    return e as VmigError;
  }
}

/** A malformed or hostile stream; `code` says which rule it broke. */
export class StreamError extends VmigError {
  constructor(code: VmigErrorCode, message: string, ctx: VmigErrorContext = {}) {
    super(code, message, ctx);
    this.name = 'StreamError';
  }
}

export class InvalidArgumentError extends VmigError {
  constructor(message: string) {
    super('VMIG_ERR_INVALID_ARG', message);
    this.name = 'InvalidArgumentError';
  }
}

/** Wrap anything thrown into a VmigError, keeping an existing one as is. */
export function toVmigError(err: unknown, fallback: VmigErrorCode, ctx: VmigErrorContext = {}): VmigError {
  if (err instanceof VmigError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new VmigError(fallback, message, ctx, { cause: err });
}

/**
 * A failure after the postcopy switch (QEMU's postcopy_pause, without recovery): the
 * destination may have run the guest, so neither side has all of it. Both ends report this,
 * with the cause's stable code and message inside the message.
 */
/**
 * A failure of the link or the peer (closed, reset, silent past the timeout, TLS), not of
 * what it carried: what postcopy recovery can get over on a new connection. A malformed or
 * hostile stream (StreamError), a cancel or a failure of this side is not.
 */
export function isTransportFailure(e: unknown): boolean {
  if (e instanceof Error && e.name === 'EndOfStream') return true;
  if (!(e instanceof VmigError) || e instanceof StreamError) return false;
  return e.code === 'VMIG_ERR_PEER_CLOSED' || e.code === 'VMIG_ERR_TIMEOUT' || e.code === 'VMIG_ERR_CHANNEL' || e.code === 'VMIG_ERR_TLS' || e.code === 'VMIG_ERR_CONNECT';
}

export function postcopySplitError(cause: VmigError): VmigError {
  return new VmigError('VMIG_ERR_POSTCOPY', `postcopy failed after the switch (${cause.code}: ${cause.message}); the guest's state is split between source and destination and neither can run it`, {
    channel: cause.channel,
    phase: 'postcopy',
  });
}

/**
 * The first error of several threads or channels (on shutdown the first error wins):
 * remembers it and tells every listener once, including listeners added later.
 */
export class FirstError {
  private err: VmigError | undefined;
  private readonly listeners: ((e: VmigError) => void)[] = [];

  get error(): VmigError | undefined {
    return this.err;
  }

  onError(cb: (e: VmigError) => void): void {
    this.listeners.push(cb);
    if (this.err) cb(this.err);
  }

  /** Records `e` if it is the first; returns whether it was. */
  set(e: VmigError): boolean {
    if (this.err) return false;
    this.err = e;
    for (const cb of this.listeners) cb(e);
    return true;
  }
}
