/** This process's CPU time and peak RSS, for reports and benchmarks. */
export function resourceUsage(): { cpuUserMs: number; cpuSystemMs: number; maxRssBytes: number } {
  const r = process.resourceUsage();
  return { cpuUserMs: Math.round(r.userCPUTime / 1000), cpuSystemMs: Math.round(r.systemCPUTime / 1000), maxRssBytes: r.maxRSS * 1024 };
}
