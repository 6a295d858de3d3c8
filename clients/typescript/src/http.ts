import { SwitchboardError } from "./errors.js";
import { retryableStatus, withScheme, type TransportClosed, type TransportOpen } from "./transport.js";

/** The `fetch` function the HTTP transports use. */
export type FetchFunction = (input: string, init?: RequestInit) => Promise<Response>;

/** Most bytes of commands sent in one `POST ?session=` (one command larger than this goes alone). */
export const MAX_BATCH_BYTES = 64 * 1024;
/** Delays between attempts to send a batch again after a network error: doubling from the first to the last. */
export const RETRY_MIN_MS = 100;
export const RETRY_MAX_MS = 2000;
/** Longest wait for the gateway's answer to `DELETE ?session=` on `close()`. */
export const END_TIMEOUT_MS = 1000;

/** What every request of the HTTP transports carries: no cache, and the client's `fetchCredentials`. */
export function requestInit(credentials: RequestCredentials): RequestInit {
  return { cache: "no-store", credentials };
}

/** The client's URL as http(s), with `params` set (and the gateway's reserved handshake parameters removed). */
export function requestUrl(url: string, params: Record<string, string>): string {
  const u = withScheme(url, "http");
  for (const name of ["token", "resume", "received", "session", "cursor", "transport"]) u.searchParams.delete(name);
  for (const [name, value] of Object.entries(params)) u.searchParams.set(name, value);
  return u.toString();
}

/** The gateway's JSON error body (`{"code","message"}`), if it is one. */
export async function errorBody(res: Response): Promise<{ code: string; message: string } | undefined> {
  try {
    return parseErrorBody(await res.text());
  } catch {
    return undefined; // the body was lost
  }
}

/** The gateway's JSON error body in `text`, if it is one. */
export function parseErrorBody(text: string): { code: string; message: string } | undefined {
  try {
    const body = JSON.parse(text);
    if (body && typeof body.code === "string") return { code: body.code, message: String(body.message ?? "") };
  } catch {
    /* not JSON */
  }
  return undefined;
}

/**
 * The error of a refused fallback handshake. `refused` (terminal) for 4xx
 * statuses other than 408, 429 and 426 (a gateway that does not offer this
 * transport); `protocol` (tried again) otherwise.
 */
export async function handshakeRefusal(res: Response): Promise<SwitchboardError> {
  const body = await errorBody(res);
  const status = res.status;
  const what = body ? ` ${body.code}: ${body.message}` : "";
  const terminal = status >= 400 && status < 500 && !retryableStatus(status) && status !== 426;
  return new SwitchboardError(terminal ? "refused" : "protocol", `handshake refused with HTTP ${status}${what}`, { status });
}

export function networkError(e: unknown): SwitchboardError {
  return new SwitchboardError("protocol", `network error: ${e instanceof Error ? e.message : String(e)}`);
}

/** UTF-8 length of a string. */
export function utf8Length(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff) {
      n += 4;
      i++;
    } else n += 3;
  }
  return n;
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * Sends the commands of an SSE or long-poll session: `POST ?session=TOKEN`,
 * `Content-Type: text/plain`, one command per line. One request is in
 * flight at a time; commands sent meanwhile go together in the next one, so
 * they reach the gateway in order. A request that fails on the network is
 * sent again (doubling delays from `RETRY_MIN_MS` to `RETRY_MAX_MS`) until
 * it is answered or the transport stops, and so is one answered with a 5xx
 * (`503 busy`; in a cluster, the node holding the session out of reach for
 * a moment). Any other answer than `204` ends the transport through
 * `failed`: `404 session_unknown` (the session ended), `409
 * session_suspended` (the gateway counts the connection as lost), `400`… A
 * `413` halves the batch size, and ends the transport only for a single
 * command too large for the gateway.
 */
export class CommandPoster {
  private queue: string[] = [];
  /** Lowered when the gateway answers 413 to a batch. */
  private maxBatchBytes = MAX_BATCH_BYTES;
  private busy = false;
  private stopped = false;
  private readonly abort = new AbortController();

  constructor(
    private readonly fetchFn: FetchFunction,
    private readonly url: string,
    private readonly failed: (error: SwitchboardError) => void,
    private readonly init: RequestInit = requestInit("same-origin"),
  ) {}

  send(text: string): void {
    if (this.stopped) return;
    this.queue.push(text);
    void this.pump();
  }

  stop(): void {
    this.stopped = true;
    this.queue = [];
    this.abort.abort();
  }

  private take(): string[] {
    const batch = [this.queue.shift()!];
    let bytes = utf8Length(batch[0]);
    while (this.queue.length > 0) {
      const next = utf8Length(this.queue[0]) + 1;
      if (bytes + next > this.maxBatchBytes) break;
      bytes += next;
      batch.push(this.queue.shift()!);
    }
    return batch;
  }

  private async pump(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      let delay = 0;
      let batch: string[] | undefined;
      while (!this.stopped) {
        if (!batch) {
          if (this.queue.length === 0) break;
          batch = this.take();
        }
        let res: Response;
        try {
          res = await this.fetchFn(this.url, {
            ...this.init,
            method: "POST",
            headers: { "content-type": "text/plain" },
            body: batch.join("\n"),
            signal: this.abort.signal,
          });
        } catch {
          if (this.stopped) return;
          delay = Math.min(RETRY_MAX_MS, Math.max(RETRY_MIN_MS, delay * 2));
          await sleep(delay);
          continue;
        }
        if (res.status >= 500) {
          // `503 busy`, or in a cluster a node that could not be reached in time: the same batch again, later.
          await res.arrayBuffer().catch(() => undefined);
          if (this.stopped) return;
          delay = Math.min(RETRY_MAX_MS, Math.max(RETRY_MIN_MS, delay * 2));
          await sleep(delay);
          continue;
        }
        delay = 0;
        if (res.status === 204 || (res.status >= 200 && res.status < 300)) {
          await res.arrayBuffer().catch(() => undefined); // frees the connection for the next request
          batch = undefined;
          continue;
        }
        if (res.status === 413 && batch.length > 1) {
          await res.arrayBuffer().catch(() => undefined);
          this.maxBatchBytes = Math.max(1, Math.floor(utf8Length(batch.join("\n")) / 2));
          this.queue.unshift(...batch);
          batch = undefined;
          continue;
        }
        const body = await errorBody(res);
        if (this.stopped) return;
        this.stop();
        this.failed(
          new SwitchboardError("protocol", `commands refused with HTTP ${res.status}${body ? ` ${body.code}: ${body.message}` : ""}`, {
            status: res.status,
          }),
        );
        return;
      }
    } finally {
      this.busy = false;
    }
  }
}

/**
 * What SSE and long-polling share: the session token learnt from the
 * `connected` push, commands through a {@link CommandPoster} (held until
 * that push arrived), `DELETE ?session=` to end, and reporting once.
 */
export abstract class HttpTransport {
  protected readonly abort = new AbortController();
  /** No more reports: closed, ended or dropped. */
  protected done = false;
  protected session: string | undefined;
  private poster: CommandPoster | undefined;
  private pending: string[] = [];

  protected readonly init: RequestInit;

  constructor(
    protected readonly fetchFn: FetchFunction,
    protected readonly open: TransportOpen,
    credentials: RequestCredentials = "same-origin",
  ) {
    this.init = requestInit(credentials);
  }

  send(text: string): void {
    if (this.done) return;
    if (this.poster) this.poster.send(text);
    else this.pending.push(text);
  }

  async end(): Promise<void> {
    const session = this.session;
    const wasDone = this.done;
    this.done = true;
    this.poster?.stop();
    if (session && !wasDone) {
      const abort = new AbortController();
      const timer = setTimeout(() => abort.abort(), END_TIMEOUT_MS);
      try {
        const res = await this.fetchFn(requestUrl(this.open.url, { session }), { ...this.init, method: "DELETE", signal: abort.signal });
        await res.arrayBuffer();
      } catch {
        /* gone already, or too slow: the session expires by itself */
      } finally {
        clearTimeout(timer);
      }
    }
    this.stop();
  }

  drop(): boolean {
    this.stop();
    return false;
  }

  /**
   * The first push names the session: commands can go from now on. Returns
   * false (and reports) when it does not, since nothing could be sent.
   */
  protected learnSession(push: unknown): boolean {
    const p = push as { push?: unknown; session?: unknown } | null;
    if (p && p.push === "connected" && typeof p.session === "string" && p.session !== "") {
      this.session = p.session;
      this.poster = new CommandPoster(
        this.fetchFn,
        requestUrl(this.open.url, { session: p.session }),
        (error) => this.report({ reason: error.message, clean: false, error }),
        this.init,
      );
      const pending = this.pending;
      this.pending = [];
      for (const text of pending) this.poster.send(text);
      return true;
    }
    this.report({
      reason: "",
      clean: false,
      error: new SwitchboardError("protocol", "the first push is not a `connected` push with a session token (the HTTP fallbacks need one)"),
    });
    return false;
  }

  protected report(event: TransportClosed): void {
    if (this.done) return;
    this.stop();
    this.open.listener.closed(event);
  }

  protected stop(): void {
    this.done = true;
    this.pending = [];
    this.poster?.stop();
    this.abort.abort();
  }
}
