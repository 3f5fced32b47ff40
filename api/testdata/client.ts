// A typed client of the Sandbox API: the types come from api/openapi.json through
// openapi-typescript (`openapi-typescript openapi.json --default-non-nullable false -o
// openapi.ts`), the calls from openapi-fetch. api/openapi_test.go generates openapi.ts beside a
// copy of this file and type-checks both with `tsc --noEmit`: every path, parameter, body and
// answer below must be what the document says. Nothing here runs in the test.
import createClient from "openapi-fetch";
import type { components, paths } from "./openapi";

type CreateSandboxRequest = components["schemas"]["CreateSandboxRequest"];
type RunRequest = components["schemas"]["RunRequest"];
type Run = components["schemas"]["Run"];
type OutputChunk = components["schemas"]["OutputChunk"];
type SandboxStatus = components["schemas"]["Sandbox"]["status"];
type ApiError = components["schemas"]["Error"];

/** Throws an error answer as an Error: the API's envelope, or the plain text of a download's 416. */
function fail(e: ApiError | string): never {
  throw new Error(typeof e === "string" ? e : `${e.code} ${e.error}: ${e.message}`);
}

/**
 * Creates a sandbox, runs code in it asynchronously, polls the run until it ends, prints its
 * output and returns it; the sandbox is deleted on the way out.
 * @param origin where sandboxd listens, e.g. "http://127.0.0.1:8080"
 */
export async function runOnce(origin: string, key: string, code: string): Promise<Run> {
  // The document's servers: "/api" and "/api/v1" for the API; "/" for /health and /metrics.
  const api = createClient<paths>({ baseUrl: `${origin}/api/v1`, headers: { "X-AgentCop-Key": key } });
  const health = await api.GET("/health", { baseUrl: origin });
  if (health.data?.status !== "ok") {
    throw new Error(`sandboxd is not healthy: ${JSON.stringify(health.data)}`);
  }

  // Bodies are declared with their types: an object literal passed straight to openapi-fetch
  // escapes TypeScript's check for unknown fields.
  const create: CreateSandboxRequest = {
    agent_id: "ts-client",
    config: { filesystem: { read_write: ["/workspace/output"] }, resources: { memory: "256m", timeout: 60 } },
  };
  const created = await api.POST("/sandbox/create", { body: create });
  if (created.error) fail(created.error);
  const sandbox_id = created.data.sandbox_id;
  try {
    let status: SandboxStatus = created.data.status; // "ready" (201) or "provisioning" (202)
    while (status === "provisioning") {
      await new Promise((r) => setTimeout(r, 200));
      const got = await api.GET("/sandbox/{sandbox_id}", { params: { path: { sandbox_id } } });
      if (got.error) fail(got.error);
      status = got.data.status;
    }
    if (status !== "ready") throw new Error(`sandbox ${sandbox_id} is ${status}`);

    const req: RunRequest = { code, async: true, timeout: 30, env: { MODE: "example" } };
    const started = await api.POST("/sandbox/{sandbox_id}/run", { params: { path: { sandbox_id } }, body: req });
    if (started.error) fail(started.error);
    const run_id = started.data.run_id;
    const path = { sandbox_id, run_id };

    let run: Run | undefined;
    while (run === undefined) {
      const got = await api.GET("/sandbox/{sandbox_id}/runs/{run_id}", { params: { path } });
      if (got.error) fail(got.error);
      if (got.data.status === "queued" || got.data.status === "running") {
        await new Promise((r) => setTimeout(r, 200));
      } else {
        run = got.data;
      }
    }
    console.log(run.stdout, run.stderr, run.exit_code, run.duration_ms, run.usage.cpu_ms);
    if (run.error !== null) console.log(run.error);
    return run;
  } finally {
    const deleted = await api.DELETE("/sandbox/{sandbox_id}", { params: { path: { sandbox_id } } });
    if (deleted.error) fail(deleted.error);
  }
}

/** The data of the stdout and stderr events of GET …/runs/{run_id}/events. */
export function chunk(data: string): string {
  const c: OutputChunk = JSON.parse(data);
  return c.data;
}

/** Uploads text to a sandbox and returns the names in the directory it went into. */
export async function upload(origin: string, key: string, sandbox_id: string, path: string, text: string): Promise<string[]> {
  const api = createClient<paths>({ baseUrl: `${origin}/api`, headers: { Authorization: `Bearer ${key}` } });
  const put = await api.PUT("/sandbox/{sandbox_id}/files", {
    params: { path: { sandbox_id }, query: { path } },
    body: text,
    bodySerializer: (b) => b,
    headers: { "Content-Type": "application/octet-stream" },
  });
  if (put.error) fail(put.error);
  const dir = path.slice(0, path.lastIndexOf("/") + 1);
  const list = await api.GET("/sandbox/{sandbox_id}/files", { params: { path: { sandbox_id }, query: { path: dir } } });
  if (list.error) fail(list.error);
  const listing = list.data; // a directory's listing, a file's bytes, or nothing (304)
  if (typeof listing !== "object") throw new Error(`${dir} is not a directory`);
  console.log(`${put.data.path}: ${put.data.size} bytes`);
  return listing.entries.map((e) => (e.type === "dir" ? e.name + "/" : e.name));
}

// What the types must refuse: the line after each @ts-expect-error must be an error, or tsc
// fails ("Unused '@ts-expect-error' directive").
export async function refused(api: ReturnType<typeof createClient<paths>>): Promise<void> {
  // @ts-expect-error: no such path (the paths are relative to the servers /api and /api/v1)
  await api.GET("/api/sandbox");
  // @ts-expect-error: agent_id is required
  await api.POST("/sandbox/create", { body: { mode: "wasm" } });
  // @ts-expect-error: no such mode
  await api.POST("/sandbox/create", { body: { agent_id: "a", mode: "vm" } });
  // @ts-expect-error: timeout is a resource, not a field of config
  const wrong: CreateSandboxRequest = { agent_id: "a", config: { timeout: 60 } };
  await api.POST("/sandbox/create", { body: wrong });
  // @ts-expect-error: the run's sandbox_id is required
  await api.POST("/sandbox/{sandbox_id}/run", { body: { code: "1" } });
  const { data } = await api.GET("/sandbox/{sandbox_id}", { params: { path: { sandbox_id: "sbx_1" } } });
  // @ts-expect-error: no such field
  console.log(data?.colour);
}
