/**
 * A multifd compression method (QEMU's MultiFDMethods): per-channel sender and receiver
 * state behind one interface. The pipeline never branches on a method's name. Calls on one
 * channel's compressor/decompressor are made one at a time, in packet order.
 */
export interface MultifdSendCompressor {
  /**
   * Compresses the packet's normal pages (concatenated). Resolves with the payload and the
   * flag to set, or undefined to send the pages raw (a nocomp packet).
   */
  compress(pages: Buffer): Promise<{ payload: Buffer; flag: number } | undefined>;
}

export interface MultifdRecvDecompressor {
  /** Decompresses `payload` into exactly `out.length` bytes of `out`, or rejects. */
  decompress(payload: Buffer, out: Buffer): Promise<void>;
}

export interface MultifdCompressionMethod {
  readonly name: string;
  /** The packet flag bits that mark this method's packets. */
  readonly flag: number;
  createSender(): MultifdSendCompressor;
  createReceiver(): MultifdRecvDecompressor;
}
