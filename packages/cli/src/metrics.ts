/**
 * `--metrics tcp:HOST:PORT` (or `unix:PATH`): Prometheus text on GET /metrics, read live at
 * each scrape (prom-client). Names follow query-migrate's fields; each side serves what it
 * knows: the source the whole query-migrate info, the destination what it received, the
 * snapshot its writer stalls. Every process also serves prom-client's own (CPU, RSS,
 * event-loop lag, heap).
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { formatMigrationUri, parseMigrationUri } from '@vmig/channel';
import { InvalidArgumentError, type LatencyBuckets, type MigrationInfo, type MigrationStatus, VmigError } from '@vmig/core';
import { collectDefaultMetrics, Counter, Gauge, type Metric, Registry } from 'prom-client';

/** Everything a side may know; a missing one serves nothing. */
export interface MetricsSource {
  status(): MigrationStatus;
  /** The source: query-migrate's info. */
  info?(): MigrationInfo | undefined;
  /** Bytes per multifd channel, in channel order. */
  channelBytes?(): number[];
  /** The destination after a postcopy switch. */
  postcopy?(): { postcopyRequests: number; postcopyPages: number } | undefined;
  /** Fault latencies of the destination's vCPUs, counted in the buckets of `boundsMs`. */
  faultLatencies?(boundsMs: readonly number[]): LatencyBuckets | undefined;
  /** Writer stalls of a background snapshot, counted in the buckets of `boundsMs`. */
  snapshotStalls?(boundsMs: readonly number[]): LatencyBuckets | undefined;
}

const STATUSES: readonly MigrationStatus[] = ['none', 'setup', 'active', 'postcopy-active', 'postcopy-paused', 'postcopy-recover', 'cancelling', 'cancelled', 'completed', 'failed'];
/** Latency buckets (seconds): 50 us to 2 s. */
const LATENCY_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2];

export function migrationRegistry(src: MetricsSource, role: string): Registry {
  const registry = new Registry();
  registry.setDefaultLabels({ role });
  collectDefaultMetrics({ register: registry });
  const registers = [registry];
  const info = (): MigrationInfo | undefined => src.info?.();
  /** A gauge read from the source at each scrape. */
  const gauge = (name: string, help: string, read: () => number | undefined): void => {
    new Gauge({
      name,
      help,
      registers,
      collect() {
        const v = read();
        if (v !== undefined) this.set(v);
      },
    });
  };
  /** A counter whose value the migration already keeps: set to it at each scrape. */
  const counter = (name: string, help: string, read: () => number | undefined): void => {
    new Counter({
      name,
      help,
      registers,
      collect() {
        const v = read();
        if (v === undefined) return;
        this.reset();
        this.inc(v);
      },
    });
  };

  new Gauge({
    name: 'vmig_migration_status',
    help: 'The migration status (query-migrate status): 1 for the current one',
    labelNames: ['status'],
    registers,
    collect() {
      const now = src.status();
      for (const s of STATUSES) this.set({ status: s }, s === now ? 1 : 0);
    },
  });
  if (src.info) {
    counter('vmig_migration_ram_transferred_bytes', 'ram.transferred: bytes written on every channel', () => info()?.ram.transferred);
    gauge('vmig_migration_ram_remaining_bytes', 'ram.remaining: bytes still dirty', () => info()?.ram.remaining);
    gauge('vmig_migration_ram_total_bytes', 'ram.total: guest RAM', () => info()?.ram.total);
    counter('vmig_migration_ram_normal_pages', 'ram.normal: pages sent whole', () => info()?.ram.normal);
    counter('vmig_migration_ram_duplicate_pages', 'ram.duplicate: zero pages', () => info()?.ram.duplicate);
    counter('vmig_migration_ram_dirty_sync_count', 'ram.dirty-sync-count: dirty-log syncs (rounds)', () => info()?.ram.dirtySyncCount);
    gauge('vmig_migration_ram_dirty_pages_rate', 'ram.dirty-pages-rate: pages dirtied per second', () => info()?.ram.dirtyPagesRate);
    gauge('vmig_migration_ram_mbps', 'ram.mbps: bandwidth as last measured (Mbit/s)', () => info()?.ram.mbps);
    gauge('vmig_migration_expected_downtime_ms', 'expected-downtime (ms)', () => info()?.expectedDowntimeMs);
    gauge('vmig_migration_downtime_ms', 'downtime once known (ms)', () => info()?.downtimeMs);
    gauge('vmig_migration_total_time_ms', 'total-time (ms)', () => info()?.totalTimeMs);
    gauge('vmig_migration_cpu_throttle_percentage', 'cpu-throttle-percentage (auto-converge)', () => info()?.cpuThrottlePercentage);
    counter('vmig_migration_ram_multifd_bytes', 'ram.multifd-bytes: bytes on the multifd channels', () => info()?.ram.multifdBytes);
    counter('vmig_migration_ram_postcopy_requests', 'ram.postcopy-requests: pages the destination asked for', () => info()?.ram.postcopyRequests);
    counter('vmig_migration_ram_postcopy_bytes', 'ram.postcopy-bytes: bytes sent after the switch', () => info()?.ram.postcopyBytes);
  }
  if (src.channelBytes) {
    const read = src.channelBytes.bind(src);
    new Counter({
      name: 'vmig_multifd_channel_bytes',
      help: 'Bytes on each multifd channel',
      labelNames: ['channel'],
      registers,
      collect() {
        this.reset();
        read().forEach((b, ch) => this.inc({ channel: String(ch) }, b));
      },
    });
  }
  if (src.postcopy) {
    const read = src.postcopy.bind(src);
    counter('vmig_migration_ram_postcopy_requests', 'postcopy-requests: pages this side asked for', () => read()?.postcopyRequests);
    counter('vmig_migration_ram_postcopy_pages', 'pages placed after the postcopy switch', () => read()?.postcopyPages);
  }
  const histogram = (name: string, help: string, read: (boundsMs: readonly number[]) => LatencyBuckets | undefined): void => {
    registry.registerMetric(latencyMetric(name, help, read));
  };
  if (src.faultLatencies) histogram('vmig_postcopy_fault_latency_seconds', 'Postcopy page-fault latency of the vCPUs (with --postcopy-blocktime)', src.faultLatencies.bind(src));
  if (src.snapshotStalls) histogram('vmig_snapshot_stall_seconds', 'How long writers stalled on a write-protected page', src.snapshotStalls.bind(src));
  return registry;
}

/**
 * A Prometheus histogram read at each scrape from the histogram the threads keep themselves
 * (core's stats/latency-histogram.ts): every latency of the run, in LATENCY_BUCKETS. prom-client's
 * own Histogram takes one observation at a time, so this one gives the registry what its get()
 * gives: cumulative `_bucket` series, `_sum` and `_count`.
 */
function latencyMetric(name: string, help: string, read: (boundsMs: readonly number[]) => LatencyBuckets | undefined): Metric {
  const boundsMs = LATENCY_BUCKETS.map((s) => s * 1000);
  const metric = {
    name,
    help,
    type: 'histogram',
    aggregator: 'sum',
    get: async () => {
      const b = read(boundsMs);
      const counts = b?.counts ?? new Array<number>(boundsMs.length + 1).fill(0);
      let acc = 0;
      const values = LATENCY_BUCKETS.map((le, i) => ({ metricName: `${name}_bucket`, labels: { le }, value: (acc += counts[i]!) }));
      acc += counts[boundsMs.length]!;
      values.push({ metricName: `${name}_bucket`, labels: { le: '+Inf' as unknown as number }, value: acc });
      return {
        name,
        help,
        type: 'histogram',
        aggregator: 'sum',
        values: [...values, { metricName: `${name}_sum`, labels: {}, value: (b?.sumMs ?? 0) / 1000 }, { metricName: `${name}_count`, labels: {}, value: acc }],
      };
    },
  };
  return metric as unknown as Metric;
}

/** The HTTP endpoint. Scrapes are answered until close(). */
export class MetricsServer {
  private constructor(
    private readonly server: http.Server,
    readonly address: string,
  ) {}

  static async listen(address: string, registry: Registry): Promise<MetricsServer> {
    const uri = parseMigrationUri(address);
    const server = http.createServer((req, res) => {
      if (req.method !== 'GET' || (req.url !== '/metrics' && req.url !== '/')) {
        res.writeHead(404).end('GET /metrics\n');
        return;
      }
      registry.metrics().then(
        (text) => res.writeHead(200, { 'Content-Type': registry.contentType }).end(text),
        (e: unknown) => res.writeHead(500).end(String(e)),
      );
    });
    // A scraper cannot keep the process alive.
    server.keepAliveTimeout = 1000;
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e: NodeJS.ErrnoException) =>
        reject(
          e.code === 'EADDRINUSE' || e.code === 'EACCES'
            ? new InvalidArgumentError(`--metrics ${address}: ${e.code === 'EADDRINUSE' ? 'address in use' : 'permission denied'}`)
            : new VmigError('VMIG_ERR_CONNECT', `--metrics ${address}: ${e.message}`),
        ),
      );
      if (uri.transport === 'tcp') server.listen(uri.port, uri.host, resolve);
      else server.listen(uri.path, resolve);
    });
    server.unref();
    const a = server.address();
    const bound = typeof a === 'object' && a ? formatMigrationUri({ transport: 'tcp', host: uri.transport === 'tcp' ? uri.host : '', port: (a as AddressInfo).port }) : address;
    return new MetricsServer(server, bound);
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
