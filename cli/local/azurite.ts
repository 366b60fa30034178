// Azurite (the Azure Storage emulator from npm) as a child process on loopback, with queue, table
// and blob services, in memory, for `npm run local`, the tests and the benchmark.
import { spawn, type ChildProcess } from "node:child_process";
import { createRequire } from "node:module";
import { createServer, connect } from "node:net";
import { dirname, join } from "node:path";

/** Azurite's well-known development account. Public by design: it is in Microsoft's docs. */
export const AZURITE_ACCOUNT = "devstoreaccount1";
export const AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

export interface Azurite {
  ports: { blob: number; queue: number; table: number };
  connectionString: string;
  stop(): Promise<void>;
}

async function portIsFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once("error", () => resolve(false));
    server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)));
  });
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

async function waitForPort(port: number, child: ChildProcess, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`azurite exited with code ${child.exitCode} before listening`);
    const open = await new Promise<boolean>((resolve) => {
      const socket = connect(port, "127.0.0.1");
      socket.once("connect", () => {
        socket.destroy();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    });
    if (open) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`azurite did not listen on 127.0.0.1:${port} within ${timeoutMs} ms`);
}

/**
 * Start Azurite. `preferDefaultPorts` tries 10000-10002 first so that `UseDevelopmentStorage=true`
 * works from another terminal; otherwise (or when they are taken) free ports are used.
 */
export async function startAzurite({ preferDefaultPorts = false }: { preferDefaultPorts?: boolean } = {}): Promise<Azurite> {
  const defaults = { blob: 10000, queue: 10001, table: 10002 };
  const useDefaults = preferDefaultPorts && (await portIsFree(10000)) && (await portIsFree(10001)) && (await portIsFree(10002));
  const ports = useDefaults ? defaults : { blob: await freePort(), queue: await freePort(), table: await freePort() };
  const require = createRequire(import.meta.url);
  const dist = join(dirname(require.resolve("azurite/package.json")), "dist", "src");
  // One process per service, as in Azure where they are separate services: the queue and the
  // tables (ledger, limits) then do not share one event loop.
  const common = ["--silent", "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--loose"];
  const services = (["queue", "table", "blob"] as const).map((service) => {
    const child = spawn(process.execPath, [join(dist, service, "main.js"), ...common, `--${service}Host`, "127.0.0.1", `--${service}Port`, String(ports[service])], { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr?.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    return { service, child, stderr: () => stderr };
  });
  try {
    for (const { service, child } of services) await waitForPort(ports[service], child, 30_000);
  } catch (error) {
    for (const { child } of services) child.kill("SIGKILL");
    throw new Error(`${(error as Error).message}\n${services.map((s) => s.stderr()).join("\n")}`);
  }
  const base = "http://127.0.0.1";
  return {
    ports,
    connectionString: useDefaults
      ? "UseDevelopmentStorage=true"
      : `DefaultEndpointsProtocol=http;AccountName=${AZURITE_ACCOUNT};AccountKey=${AZURITE_KEY};` +
        `BlobEndpoint=${base}:${ports.blob}/${AZURITE_ACCOUNT};QueueEndpoint=${base}:${ports.queue}/${AZURITE_ACCOUNT};TableEndpoint=${base}:${ports.table}/${AZURITE_ACCOUNT};`,
    stop: async () => {
      await Promise.all(
        services.map(({ child }) =>
          new Promise<void>((resolve) => {
            if (child.exitCode !== null) return resolve();
            child.once("exit", () => resolve());
            child.kill("SIGTERM");
            setTimeout(() => child.kill("SIGKILL"), 3_000).unref();
          }),
        ),
      );
    },
  };
}
