// Apollo Client (@apollo/client/core) over the gateway: a query, a mutation
// and a subscription through GraphQLWsLink (graphql-ws, the modern
// protocol), and the same through the deprecated WebSocketLink
// (subscriptions-transport-ws, the legacy protocol), which this version of
// Apollo Client still ships. Contract: docs/graphql.md.
//
// Needs: target/release/switchboard (cargo build --release -p switchboard).
// Run: npm test (npm ci in examples/graphql-origin, then node --test).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { ApolloClient, InMemoryCache, gql } from "@apollo/client/core";
import { GraphQLWsLink } from "@apollo/client/link/subscriptions";
import { WebSocketLink } from "@apollo/client/link/ws";
import { createClient } from "graphql-ws";
import { SubscriptionClient } from "subscriptions-transport-ws";
import WebSocket from "ws";
import { Feed, startStack } from "./helpers.mjs";

const COUNTER = gql`
  query Counter {
    counter
  }
`;
const INCREMENT = gql`
  mutation Increment($by: Int) {
    increment(by: $by)
  }
`;
const SEND = gql`
  mutation Send($room: String!, $text: String!) {
    send(room: $room, text: $text) {
      id
      text
    }
  }
`;
const ROOM = gql`
  subscription Room($room: String!) {
    messages(room: $room) {
      id
      text
    }
  }
`;

let stack;

/** Query, mutation and subscription through `client`, in room `room`. */
async function exercise(client, room) {
  const { data: before } = await client.query({ query: COUNTER, fetchPolicy: "network-only" });
  assert.equal(typeof before.counter, "number");
  const { data: incremented } = await client.mutate({ mutation: INCREMENT, variables: { by: 4 } });
  assert.equal(incremented.increment, before.counter + 4);

  const feed = new Feed(`Room ${room}`);
  const subscription = client.subscribe({ query: ROOM, variables: { room } }).subscribe(feed.observer);
  try {
    const initial = await feed.next();
    assert.equal(initial.error, undefined, `subscription error: ${initial.error}`);
    assert.deepEqual(initial.data.messages, []);
    const { data: sent } = await client.mutate({ mutation: SEND, variables: { room, text: "from apollo" } });
    assert.equal(sent.send.text, "from apollo");
    const pushed = await feed.next();
    assert.equal(pushed.error, undefined, `subscription error: ${pushed.error}`);
    assert.deepEqual(
      pushed.data.messages.map((m) => ({ id: m.id, text: m.text })),
      [{ id: sent.send.id, text: "from apollo" }],
    );
  } finally {
    subscription.unsubscribe();
  }
}

describe("Apollo Client through the gateway", { timeout: 60_000 }, () => {
  before(async () => {
    stack = await startStack();
  });
  after(async () => {
    await stack?.stop();
  });

  test("GraphQLWsLink (graphql-ws): query, mutation, subscription", { timeout: 20_000 }, async () => {
    const ws = createClient({ url: stack.wsUrl, webSocketImpl: WebSocket, retryAttempts: 0 });
    const client = new ApolloClient({ link: new GraphQLWsLink(ws), cache: new InMemoryCache() });
    try {
      await exercise(client, "apollo-modern");
    } finally {
      client.stop();
      await ws.dispose();
    }
  });

  test("WebSocketLink (subscriptions-transport-ws): query, mutation, subscription", { timeout: 20_000 }, async () => {
    const ws = new SubscriptionClient(stack.wsUrl, { reconnect: false }, WebSocket);
    const client = new ApolloClient({ link: new WebSocketLink(ws), cache: new InMemoryCache() });
    try {
      await exercise(client, "apollo-legacy");
    } finally {
      client.stop();
      ws.close();
    }
  });
});
