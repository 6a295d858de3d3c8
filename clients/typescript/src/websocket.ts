import { SwitchboardError } from "./errors.js";
import { handshakeUrl, retryableStatus, type Transport, type TransportClosed, type TransportOpen } from "./transport.js";
import type { WebSocketConstructor, WebSocketLike } from "./types.js";

/** The native protocol's subprotocol name. */
export const PROTOCOL = "switchboard.v1";

const CONNECTING = 0;
const OPEN = 1;
const CLOSED = 3;

const noop = () => {};

/**
 * The native protocol over one WebSocket (`Sec-WebSocket-Protocol:
 * switchboard.v1`), with a browser's `WebSocket` or the `ws` package's.
 */
export class WebSocketTransport implements Transport {
  readonly name = "websocket" as const;
  private readonly ws: WebSocketLike;
  private readonly listeners: [string, (e: any) => void][] = [];
  /** Commands sent before the socket opened. */
  private pending: string[] | undefined = [];
  /** No more reports: closed, ended or dropped. */
  private done = false;
  private handshakeError: SwitchboardError | undefined;

  constructor(WS: WebSocketConstructor, private readonly open: TransportOpen) {
    this.ws = new WS(handshakeUrl(open, "ws").toString(), PROTOCOL);
    const ws = this.ws;
    ws.binaryType = "arraybuffer";
    // Keeps the `ws` package from throwing an 'error' nobody listens to once our listeners are gone.
    ws.addEventListener("error", noop);
    this.listen("open", () => {
      if (ws.protocol !== PROTOCOL) {
        this.report({
          reason: "",
          clean: false,
          error: new SwitchboardError("unsupported_protocol", `the gateway did not select ${PROTOCOL} (got "${ws.protocol}")`),
        });
        return;
      }
      const pending = this.pending ?? [];
      this.pending = undefined;
      for (const text of pending) this.send(text);
    });
    this.listen("message", (ev: { data: unknown }) => {
      // The gateway sends text frames only.
      if (!this.done && typeof ev.data === "string") this.open.listener.frame(ev.data);
    });
    this.listen("error", (ev: any) => {
      // Only the `ws` package says why a handshake failed; a browser does not.
      const message = String(ev?.message ?? ev?.error?.message ?? "");
      const m = /Unexpected server response: (\d+)/.exec(message);
      if (m) {
        const status = Number(m[1]);
        this.handshakeError = new SwitchboardError(retryableStatus(status) ? "protocol" : "refused", `handshake refused with HTTP ${status}`, { status });
      }
    });
    this.listen("close", (ev: { code: number; reason?: string; wasClean?: boolean }) => {
      const closed: TransportClosed = { code: ev.code, reason: ev.reason ?? "", clean: ev.wasClean === true };
      if (this.handshakeError) closed.error = this.handshakeError;
      this.report(closed);
    });
    // `ws` only: the gateway's pings prove the link alive (browsers answer them unseen).
    ws.on?.("ping", () => {
      if (!this.done) this.open.listener.alive();
    });
  }

  send(text: string): void {
    if (this.done) return;
    if (this.pending) this.pending.push(text);
    else this.ws.send(text);
  }

  end(code = 1000, reason = "client closed"): Promise<void> {
    this.stop();
    const ws = this.ws;
    if (ws.readyState === CLOSED) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        ws.terminate?.();
        resolve();
      }, 1000);
      ws.addEventListener("close", () => {
        clearTimeout(timer);
        resolve();
      });
      try {
        ws.close(code, reason);
      } catch {
        ws.terminate?.();
        clearTimeout(timer);
        resolve();
      }
    });
  }

  /**
   * Drops the socket without a close frame, so that the gateway keeps the
   * session for a resume. The `ws` package can (`terminate()`). A browser
   * WebSocket cannot: `close()` would send a close frame and end the session.
   * So an open browser socket is left alone (returns true): the resume on a
   * new connection makes the gateway close it (4009), or its pong timeout
   * ends it; the client closes it itself (`end()`) only once a new session
   * started, or on `close()`. A socket still connecting is aborted with
   * `close()`, which sends nothing.
   */
  drop(gone?: () => void): boolean {
    this.stop();
    const ws = this.ws;
    if (typeof ws.terminate === "function") {
      try {
        ws.terminate();
      } catch {
        /* already closed */
      }
      return false;
    }
    if (ws.readyState === CONNECTING) {
      try {
        ws.close();
      } catch {
        /* already closed */
      }
      return false;
    }
    if (ws.readyState === OPEN) {
      if (gone) ws.addEventListener("close", () => gone());
      return true;
    }
    return false;
  }

  private listen(type: string, fn: (e: any) => void): void {
    this.ws.addEventListener(type, fn);
    this.listeners.push([type, fn]);
  }

  private report(event: TransportClosed): void {
    if (this.done) return;
    this.stop();
    this.open.listener.closed(event);
  }

  /** Stops listening: nothing is reported any more. */
  private stop(): void {
    this.done = true;
    this.pending = undefined;
    for (const [type, fn] of this.listeners) this.ws.removeEventListener(type, fn);
    this.listeners.length = 0;
  }
}
