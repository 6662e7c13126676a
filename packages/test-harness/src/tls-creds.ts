/**
 * Test credentials for TLS, made at test time with the system's `openssl` (never committed):
 * a directory in QEMU's tls-creds-x509 layout, with a CA, a server certificate for
 * 127.0.0.1 and localhost, and a client certificate.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface TlsCredsOptions {
  /** The client certificate's subject (default `/O=vmig/CN=vmig-client`). */
  clientSubject?: string;
  /** The server certificate's names (default IP 127.0.0.1 and DNS localhost). */
  serverAltNames?: string;
}

function openssl(cwd: string, args: string[]): void {
  const r = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr || r.error?.message}`);
}

/** Makes `dir` (created if needed) a complete credentials directory with a CA of its own. */
export function makeTlsCreds(dir: string, opts: TlsCredsOptions = {}): string {
  mkdirSync(dir, { recursive: true });
  const key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl(dir, ['req', '-x509', ...key, '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=vmig test CA']);
  writeFileSync(join(dir, 'server.ext'), `subjectAltName=${opts.serverAltNames ?? 'IP:127.0.0.1,DNS:localhost'}\n`);
  for (const [who, subj, ext] of [
    ['server', '/CN=localhost', ['-extfile', 'server.ext']],
    ['client', opts.clientSubject ?? '/O=vmig/CN=vmig-client', []],
  ] as const) {
    openssl(dir, ['req', ...key, '-keyout', `${who}-key.pem`, '-out', `${who}.csr`, '-subj', subj]);
    openssl(dir, ['x509', '-req', '-in', `${who}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${who}-cert.pem`, '-days', '2', ...ext]);
  }
  return dir;
}
