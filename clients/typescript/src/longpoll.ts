import { SwitchboardError } from "./errors.js";
import {
  HttpTransport,
  parseErrorBody,
  handshakeRefusal,
  networkError,
  requestUrl,
  sleep,
  RETRY_MAX_MS,
  RETRY_MIN_MS,
  type FetchFunction,
} from "./http.js";
import { handshakeUrl, type Transport, type TransportOpen } from "./transport.js";

/** One answer of a long-poll: the pushes of a batch and the cursor that acknowledges it. */
interface PollAnswer {
  cursor: number;
  pushes: unknown[];
  close?: { code?: number; reason?: string };
}

/**
 * Long-polling (docs/fallbacks.md), for networks whose proxies buffer
 * streamed answers: `GET ?transport=long-poll` opens the session and answers
 * the first batch (the `connected` push); then each poll,
 * `GET ?transport=long-poll&session=TOKEN&cursor=N`, acknowledges the last
 * batch with its cursor and waits for the next one. A poll whose answer is
 * lost on the network, or answered with a 5xx (in a cluster, the node
 * holding the session out of reach for a moment), is sent again with the
 * same cursor (doubling delays from `RETRY_MIN_MS` to `RETRY_MAX_MS`): the
 * gateway answers the same batch again, so nothing is lost or doubled.
 * `409 poll_replaced` (another poll of ours took over) is not an error; any
 * other refusal (`409 session_suspended`, `409 session_ended`,
 * `404 session_unknown`, `409 bad_cursor`) ends it as a lost link, and the
 * client resumes. A `close` in an answer ends it with the gateway's code.
 * Commands go as `POST ?session=`.
 */
export class LongPollTransport extends HttpTransport implements Transport {
  readonly name = "long-poll" as const;
  private cursor = 0;

  constructor(fetchFn: FetchFunction, open: TransportOpen, credentials?: RequestCredentials) {
    super(fetchFn, open, credentials);
    void this.run();
  }

  private async run(): Promise<void> {
    const openUrl = handshakeUrl(this.open, "http");
    openUrl.searchParams.set("transport", "long-poll");
    let answer: unknown;
    let res: Response;
    try {
      res = await this.fetchFn(openUrl.toString(), { ...this.init, signal: this.abort.signal });
    } catch (e) {
      this.report({ reason: "", clean: false, error: networkError(e), unreachable: true });
      return;
    }
    try {
      if (this.done) return;
      if (res.status !== 200) {
        this.report({ reason: "", clean: false, error: await handshakeRefusal(res) });
        return;
      }
      answer = parseAnswer(await res.text());
    } catch (e) {
      this.report({ reason: "", clean: false, error: networkError(e) });
      return;
    }
    if (!this.handle(answer)) return;
    let delay = 0;
    while (!this.done) {
      const url = requestUrl(this.open.url, { transport: "long-poll", session: this.session!, cursor: String(this.cursor) });
      let res: Response;
      let text: string;
      try {
        res = await this.fetchFn(url, { ...this.init, signal: this.abort.signal });
        text = await res.text();
      } catch {
        if (this.done) return;
        // The answer is lost (or the poll never arrived): ask again for the same batch.
        delay = Math.min(RETRY_MAX_MS, Math.max(RETRY_MIN_MS, delay * 2));
        await sleep(delay);
        continue;
      }
      if (this.done) return;
      if (res.status >= 500) {
        // In a cluster, the node holding the session out of reach for a moment: the same poll again, later.
        delay = Math.min(RETRY_MAX_MS, Math.max(RETRY_MIN_MS, delay * 2));
        await sleep(delay);
        continue;
      }
      delay = 0;
      if (res.status === 200) {
        if (!this.handle(parseAnswer(text))) return;
        continue;
      }
      const body = parseErrorBody(text);
      if (res.status === 409 && body?.code === "poll_replaced") {
        await sleep(RETRY_MIN_MS);
        continue;
      }
      this.report({
        reason: "",
        clean: false,
        error: new SwitchboardError("protocol", `poll refused with HTTP ${res.status}${body ? ` ${body.code}: ${body.message}` : ""}`, {
          status: res.status,
        }),
      });
      return;
    }
  }

  /** Hands a batch to the client; false once the transport is over (closed, dropped, or an unreadable answer). */
  private handle(answer: unknown): boolean {
    if (this.done) return false;
    const a = answer as PollAnswer | undefined;
    if (!a || typeof a.cursor !== "number" || !Array.isArray(a.pushes)) {
      this.report({ reason: "", clean: false, error: new SwitchboardError("protocol", "an unreadable long-poll answer") });
      return false;
    }
    this.open.listener.alive();
    for (const push of a.pushes) {
      if (this.done) return false;
      if (this.session === undefined && !this.learnSession(push)) return false;
      this.open.listener.frame(JSON.stringify(push));
    }
    if (this.done) return false;
    this.cursor = a.cursor;
    if (a.close && typeof a.close === "object") {
      this.report({ code: typeof a.close.code === "number" ? a.close.code : 1005, reason: String(a.close.reason ?? ""), clean: true });
      return false;
    }
    if (this.session === undefined) {
      this.report({ reason: "", clean: false, error: new SwitchboardError("protocol", "the long-poll opened without a `connected` push") });
      return false;
    }
    return true;
  }
}

function parseAnswer(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}
