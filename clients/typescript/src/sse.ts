import { SwitchboardError } from "./errors.js";
import { HttpTransport, handshakeRefusal, networkError, type FetchFunction } from "./http.js";
import { handshakeUrl, type Transport, type TransportOpen } from "./transport.js";

/** One event of a `text/event-stream`. */
export interface SseEvent {
  /** The `event:` field, `message` when absent. */
  type: string;
  /** The `data:` lines, joined with `\n`. */
  data: string;
  /** The last `id:` seen in the stream (empty when none). */
  id: string;
}

/**
 * An incremental `text/event-stream` parser (the WHATWG HTML standard's
 * rules): feed it decoded text in chunks of any size; it reports each
 * complete event, and each comment line (a line starting with `:`, the
 * gateway's heartbeat). Lines end with CRLF, LF or CR, also when a chunk
 * ends between CR and LF. An event is dispatched at an empty line, and only
 * when it has data; what is left unterminated at the end of a stream is not
 * an event.
 */
export class SseParser {
  /** The unterminated line so far (never holds a line break). */
  private line = "";
  private data = "";
  private type = "";
  private id = "";
  private start = true;
  /** The previous chunk ended with CR: a LF opening the next one belongs to it. */
  private afterCr = false;

  constructor(
    private readonly onEvent: (event: SseEvent) => void,
    private readonly onComment: (text: string) => void = () => {},
  ) {}

  push(chunk: string): void {
    let text = chunk;
    if (this.afterCr && text.length > 0) {
      this.afterCr = false;
      if (text.charCodeAt(0) === 10) text = text.slice(1);
    }
    if (this.start && text.length > 0) {
      this.start = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    let from = 0;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = this.line + text.slice(from, i);
      this.line = "";
      if (c === 13) {
        if (i + 1 < text.length) {
          if (text.charCodeAt(i + 1) === 10) i++;
        } else {
          this.afterCr = true;
        }
      }
      from = i + 1;
      this.processLine(line);
    }
    this.line += text.slice(from);
  }

  private processLine(line: string): void {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.charCodeAt(0) === 58 /* : */) {
      this.onComment(line.slice(1));
      return;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    switch (field) {
      case "event":
        this.type = value;
        break;
      case "data":
        this.data += value + "\n";
        break;
      case "id":
        if (!value.includes("\0")) this.id = value;
        break;
      default:
        break; // `retry` and unknown fields: nothing to do here
    }
  }

  private dispatch(): void {
    const data = this.data;
    const type = this.type;
    this.data = "";
    this.type = "";
    if (data === "") return;
    this.onEvent({ type: type === "" ? "message" : type, data: data.slice(0, -1), id: this.id });
  }
}

/**
 * Bidirectional SSE (docs/fallbacks.md): the pushes come as events of one
 * long `GET` answer (`Accept: text/event-stream`), read with `fetch` and a
 * streaming body reader (so it can carry the token and works in Node 18+ and
 * browsers); commands go as `POST ?session=`. Heartbeat comments are
 * reported as `alive`; `event: close` ends it with the gateway's code; the
 * stream ending without one is a lost link (the client resumes).
 */
export class SseTransport extends HttpTransport implements Transport {
  readonly name = "sse" as const;

  constructor(fetchFn: FetchFunction, open: TransportOpen, credentials?: RequestCredentials) {
    super(fetchFn, open, credentials);
    void this.run();
  }

  private async run(): Promise<void> {
    let res: Response;
    try {
      res = await this.fetchFn(handshakeUrl(this.open, "http").toString(), {
        ...this.init,
        headers: { accept: "text/event-stream" },
        signal: this.abort.signal,
      });
    } catch (e) {
      this.report({ reason: "", clean: false, error: networkError(e), unreachable: true });
      return;
    }
    if (this.done) return;
    const type = res.headers.get("content-type") ?? "";
    if (res.status !== 200 || !type.startsWith("text/event-stream") || !res.body) {
      const error =
        res.status === 200
          ? new SwitchboardError("protocol", `the answer is not an event stream (content-type "${type}")`)
          : await handshakeRefusal(res);
      this.report({ reason: "", clean: false, error });
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser(
      (event) => this.onEvent(event),
      () => {
        if (!this.done) this.open.listener.alive();
      },
    );
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (this.done) break;
        if (done) {
          this.report({ reason: "", clean: false, error: new SwitchboardError("protocol", "the event stream ended without a close event") });
          return;
        }
        parser.push(decoder.decode(value, { stream: true }));
        if (this.done) break;
      }
    } catch (e) {
      this.report({ reason: "", clean: false, error: networkError(e) });
      return;
    }
    reader.cancel().catch(() => {});
  }

  private onEvent(event: SseEvent): void {
    if (this.done) return;
    if (event.type === "message") {
      if (this.session === undefined) {
        let push: unknown;
        try {
          push = JSON.parse(event.data);
        } catch {
          push = undefined;
        }
        if (!this.learnSession(push)) return;
      }
      this.open.listener.frame(event.data);
    } else if (event.type === "close") {
      let code = 1005;
      let reason = "";
      try {
        const c = JSON.parse(event.data);
        if (typeof c?.code === "number") code = c.code;
        if (typeof c?.reason === "string") reason = c.reason;
      } catch {
        /* a close without readable data: 1005, no status */
      }
      this.report({ code, reason, clean: true });
    }
    // Other named events belong to plain EventSource streams: not ours.
  }
}
