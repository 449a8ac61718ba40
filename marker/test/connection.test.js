import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";

import { AmpsConnection, State, reconnectDelayMs } from "../src/connection.js";

const BACKOFF = { initialMs: 500, maximumMs: 5000, factor: 2, jitter: 0.2 };

describe("reconnectDelayMs", () => {
  test("starts at the initial delay", () => {
    expect(500).toBe(reconnectDelayMs(0, () => 0.5, BACKOFF));
  });

  test("doubles per attempt", () => {
    expect(2000).toBe(reconnectDelayMs(2, () => 0.5, BACKOFF));
  });

  test("is capped at the maximum", () => {
    expect(5000).toBe(reconnectDelayMs(30, () => 0.5, BACKOFF));
  });

  test("spreads by the jitter fraction", () => {
    expect([400, 600]).toEqual([reconnectDelayMs(0, () => 0, BACKOFF), reconnectDelayMs(0, () => 1, BACKOFF)]);
  });
});

// A stand-in for amps.Client with the calls AmpsConnection makes.
class FakeClient {
  constructor(name, broker) {
    this.name = name;
    this.broker = broker;
    this.commands = [];
    this.handlers = [];
    this.disconnected = false;
  }
  errorHandler(handler) {
    this.onError = handler;
    return this;
  }
  disconnectHandler(handler) {
    this.onDisconnect = handler;
    return this;
  }
  heartbeat() {
    return this;
  }
  connect(url) {
    this.url = url;
    return this.broker.up ? Promise.resolve({}) : Promise.reject(new Error("WebSocket closed"));
  }
  execute(command, handler) {
    this.commands.push(command);
    this.handlers.push(handler);
    return Promise.resolve("auto1");
  }
  disconnect() {
    this.disconnected = true;
    return Promise.resolve({});
  }
  ack(status, reason) {
    const header = { command: () => "ack", status: () => status, reason: () => reason };
    for (const handler of this.handlers) {
      handler({ header });
    }
  }
}

function harness({ up }) {
  const broker = { up };
  const clients = [];
  const states = [];
  const connection = new AmpsConnection({
    url: "ws://127.0.0.1:1/amps/json",
    clientName: "test",
    heartbeatS: 0,
    onState: (state) => states.push(state.status),
    createClient: (name) => {
      const client = new FakeClient(name, broker);
      clients.push(client);
      return client;
    },
  });
  return { broker, clients, states, connection };
}

describe("AmpsConnection", () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });

  afterEach(() => {
    vi.useRealTimers();
  });

  test("is connected once the logon succeeds", async () => {
    const { connection, states } = harness({ up: true });
    connection.start();
    await vi.advanceTimersByTimeAsync(0);
    expect([State.CONNECTING, State.CONNECTED]).toEqual(states);
  });

  test("retries with a new client while the broker is down", async () => {
    const { connection, broker, clients } = harness({ up: false });
    connection.start();
    await vi.advanceTimersByTimeAsync(0);
    broker.up = true;
    await vi.advanceTimersByTimeAsync(1000);
    expect([2, State.CONNECTED]).toEqual([clients.length, connection.state.status]);
  });

  test("reconnects after the connection drops", async () => {
    const { connection, clients } = harness({ up: true });
    connection.start();
    await vi.advanceTimersByTimeAsync(0);
    clients[0].onDisconnect(clients[0], new Error("socket closed"));
    expect([State.DISCONNECTED, "socket closed"]).toEqual([connection.state.status, connection.state.reason]);
    await vi.advanceTimersByTimeAsync(1000);
    expect([2, State.CONNECTED]).toEqual([clients.length, connection.state.status]);
  });

  test("publishes with the CorrelationId and a processed ack request", async () => {
    const { connection, clients } = harness({ up: true });
    connection.start();
    await vi.advanceTimersByTimeAsync(0);
    const published = connection.publish("internal", '{"id":"m1"}', "00ab");
    clients[0].ack("success");
    await published;
    const header = clients[0].commands[0].rawHeader();
    expect(["publish", "internal", "00ab", "processed"]).toEqual([header.c, header.t, header.x, header.a]);
  });

  test("fails a publish that AMPS rejects, with the reason", async () => {
    const { connection, clients } = harness({ up: true });
    connection.start();
    await vi.advanceTimersByTimeAsync(0);
    const published = connection.publish("internal", "{}", "00ab");
    clients[0].ack("failure", "not entitled");
    await expect(published).rejects.toThrow("rejected by AMPS: not entitled");
  });

  test("fails a publish while disconnected", async () => {
    const { connection } = harness({ up: false });
    connection.start();
    await vi.advanceTimersByTimeAsync(0);
    await expect(connection.publish("internal", "{}", "00ab")).rejects.toThrow("not connected to AMPS");
  });

  test("fails a pending publish when the connection drops", async () => {
    const { connection, clients } = harness({ up: true });
    connection.start();
    await vi.advanceTimersByTimeAsync(0);
    const published = connection.publish("internal", "{}", "00ab");
    clients[0].onDisconnect(clients[0], new Error("socket closed"));
    await expect(published).rejects.toThrow("connection lost before acknowledgement (socket closed)");
  });

  test("fails a publish that is never acknowledged", async () => {
    const { connection } = harness({ up: true });
    connection.start();
    await vi.advanceTimersByTimeAsync(0);
    const published = connection.publish("internal", "{}", "00ab", { ackTimeoutMs: 100 });
    const outcome = expect(published).rejects.toThrow("no acknowledgement from AMPS within 100 ms");
    await vi.advanceTimersByTimeAsync(100);
    await outcome;
  });

  test("stops reconnecting after stop()", async () => {
    const { connection, clients } = harness({ up: false });
    connection.start();
    await vi.advanceTimersByTimeAsync(0);
    connection.stop();
    await vi.advanceTimersByTimeAsync(10000);
    expect(1).toBe(clients.length);
  });
});
