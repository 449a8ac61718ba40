// One AMPS connection over WebSocket with the official JavaScript client,
// reconnecting by itself with capped, jittered exponential backoff.
//
// The client's own reconnect (server chooser + delay strategy) only runs
// after a connection was established once; a page opened while the broker is
// down must retry as well, so this module owns the whole loop: every attempt
// uses a fresh Client, and the disconnect handler of the current client
// schedules the next attempt.

import { Client, Command } from "amps";

/** Connection states shown on the page. */
export const State = Object.freeze({
  CONNECTING: "connecting",
  CONNECTED: "connected",
  DISCONNECTED: "disconnected",
});

const DEFAULT_BACKOFF = Object.freeze({ initialMs: 500, maximumMs: 5000, factor: 2, jitter: 0.2 });

/**
 * Delay before reconnect attempt number `attempt` (0-based).
 *
 * @param {number} attempt
 * @param {() => number} random a value in [0, 1)
 * @param {{initialMs: number, maximumMs: number, factor: number, jitter: number}} backoff
 */
export function reconnectDelayMs(attempt, random, backoff = DEFAULT_BACKOFF) {
  const base = Math.min(backoff.maximumMs, backoff.initialMs * backoff.factor ** attempt);
  const spread = base * backoff.jitter;
  return Math.round(base - spread + 2 * spread * random());
}

function reasonOf(error) {
  if (error instanceof Error && error.message) {
    return error.message;
  }
  if (typeof error === "string" && error) {
    return error;
  }
  return "connection closed";
}

export class AmpsConnection {
  /**
   * @param {object} options
   * @param {string} options.url ws://host:port/amps/json
   * @param {string} options.clientName prefix of the AMPS client name
   * @param {(state: {status: string, reason: string|null, retryAt: number|null}) => void} options.onState
   * @param {number} [options.heartbeatS] AMPS heartbeat interval; 0 disables
   * @param {(name: string) => Client} [options.createClient]
   */
  constructor({ url, clientName, onState, heartbeatS = 10, createClient = (name) => new Client(name) }) {
    this.url = url;
    this.clientName = clientName;
    this.onState = onState;
    this.heartbeatS = heartbeatS;
    this.createClient = createClient;
    this.client = null;
    this.attempt = 0;
    this.generation = 0;
    this.retryTimer = null;
    this.stopped = true;
    this.pending = new Set();
    this.state = { status: State.DISCONNECTED, reason: null, retryAt: null };
  }

  _setState(status, reason = null, retryAt = null) {
    this.state = { status, reason, retryAt };
    this.onState(this.state);
  }

  /** Start connecting; reconnects until stop() is called. */
  start() {
    this.stopped = false;
    this._connect();
  }

  /** Disconnect and stop reconnecting. */
  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.generation += 1;
    const client = this.client;
    this.client = null;
    this._failPending("page closed");
    if (client !== null) {
      client.disconnect().catch(() => {});
    }
  }

  async _connect() {
    this.generation += 1;
    const generation = this.generation;
    this._setState(State.CONNECTING);
    const suffix = Math.random().toString(36).slice(2, 10);
    const client = this.createClient(`${this.clientName}-${suffix}`);
    client.errorHandler((error) => {
      console.warn("AMPS client error:", reasonOf(error));
    });
    // Replaces the client's default handler (which would reconnect on its
    // own) so there is exactly one reconnect loop.
    client.disconnectHandler((_client, error) => {
      if (generation === this.generation) {
        this._lost(reasonOf(error));
      }
    });
    if (this.heartbeatS > 0) {
      client.heartbeat(this.heartbeatS);
    }
    try {
      await client.connect(this.url);
    } catch (error) {
      if (generation === this.generation) {
        // Browsers hide why a WebSocket failed (HTTP status, refused port).
        const detail = reasonOf(error);
        this._lost(detail === "connection closed" ? "cannot reach the broker" : `cannot connect: ${detail}`);
      }
      return;
    }
    if (generation !== this.generation) {
      client.disconnect().catch(() => {});
      return;
    }
    this.client = client;
    this.attempt = 0;
    this._setState(State.CONNECTED);
  }

  _lost(reason) {
    this.generation += 1;
    const client = this.client;
    this.client = null;
    this._failPending(`connection lost before acknowledgement (${reason})`);
    if (client !== null) {
      client.disconnect().catch(() => {});
    }
    if (this.stopped) {
      this._setState(State.DISCONNECTED, reason);
      return;
    }
    const delay = reconnectDelayMs(this.attempt, Math.random);
    this.attempt += 1;
    this._setState(State.DISCONNECTED, reason, Date.now() + delay);
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this._connect(), delay);
  }

  _failPending(reason) {
    for (const entry of [...this.pending]) {
      entry.settle(new Error(reason));
    }
  }

  /**
   * Publish `body` to `topic` with the CorrelationId header, resolving when
   * AMPS acknowledges it as processed.
   *
   * @returns {Promise<void>} rejects with an Error whose message is the reason.
   */
  publish(topic, body, correlationId, { ackTimeoutMs = 5000 } = {}) {
    const client = this.client;
    if (client === null || this.state.status !== State.CONNECTED) {
      return Promise.reject(new Error(`not connected to AMPS (${this.state.status})`));
    }
    return new Promise((resolve, reject) => {
      const entry = {
        timer: setTimeout(
          () => entry.settle(new Error(`no acknowledgement from AMPS within ${ackTimeoutMs} ms`)),
          ackTimeoutMs,
        ),
        settle: (error) => {
          if (!this.pending.delete(entry)) {
            return;
          }
          clearTimeout(entry.timer);
          if (error === null) {
            resolve();
          } else {
            reject(error);
          }
        },
      };
      this.pending.add(entry);
      const command = new Command("publish")
        .topic(topic)
        .data(body)
        .correlationId(correlationId)
        .ackType("processed");
      client
        .execute(command, (message) => {
          if (message.header.command() !== "ack") {
            return;
          }
          if (message.header.status() === "success") {
            entry.settle(null);
          } else {
            entry.settle(new Error(`rejected by AMPS: ${message.header.reason() || message.header.status()}`));
          }
        })
        .catch((error) => entry.settle(new Error(reasonOf(error))));
    });
  }
}
