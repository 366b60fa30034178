// The local HTTP doubles must know their real port before they are configured (issuer and token
// URLs carry it), so they listen first: on loopback, on a free port unless one is asked for.
import type { Server } from "node:http";
import type { AddressInfo } from "node:net";

export async function listenLoopback(server: Server, options: { host?: string; port?: number }): Promise<{ host: string; port: number; origin: string }> {
  const host = options.host ?? "127.0.0.1";
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 0, host, () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return { host, port, origin: `http://${host.includes(":") ? `[${host}]` : host}:${port}` };
}
