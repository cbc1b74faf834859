// Interop scenarios of backplane-server with the official @microsoft/signalr client (JSON and
// MessagePack, with @microsoft/signalr-protocol-msgpack).
//
// Driven by server/tests/interop.rs, which starts two server processes on one PostgreSQL and
// passes their URLs in NODE_A and NODE_B and the JWT secret in JWT_SECRET. To restart node B,
// this script prints "RESTART B" and waits for "RESTARTED" on stdin.
//
// Every wait is bounded; any failure exits non-zero with the scenario's name.

import * as signalR from "@microsoft/signalr";
import { MessagePackHubProtocol } from "@microsoft/signalr-protocol-msgpack";
import { createHmac } from "node:crypto";
import { connect, createServer } from "node:net";
import { createInterface } from "node:readline";

const A = process.env.NODE_A;
const B = process.env.NODE_B;
const SECRET = process.env.JWT_SECRET;
const WAIT_MS = 10_000;

const lines = createInterface({ input: process.stdin });
const stdinLines = [];
const stdinWaiters = [];
lines.on("line", (line) => {
  const waiter = stdinWaiters.shift();
  if (waiter) waiter(line);
  else stdinLines.push(line);
});
function nextStdinLine() {
  if (stdinLines.length) return Promise.resolve(stdinLines.shift());
  return new Promise((resolve) => stdinWaiters.push(resolve));
}

function b64url(data) {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 JWT for `user`, valid for an hour. */
function token(user) {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = b64url(JSON.stringify({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600 }));
  const signature = createHmac("sha256", SECRET).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${signature}`;
}

function within(promise, what, ms = WAIT_MS) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** A connection that records every invocation it receives, by method name. */
class Client {
  constructor(base, user, options = {}) {
    this.user = user;
    this.events = [];
    this.waiters = [];
    let builder = new signalR.HubConnectionBuilder()
      .withUrl(`${base}/hubs/chat`, { accessTokenFactory: () => token(user) })
      .configureLogging(signalR.LogLevel.Error);
    if (options.reconnect) builder = builder.withAutomaticReconnect([0, 200, 500, 1000, 1000, 1000, 2000, 2000, 2000]);
    if (options.stateful) builder = builder.withStatefulReconnect();
    if (options.msgpack) builder = builder.withHubProtocol(new MessagePackHubProtocol());
    this.connection = builder.build();
    for (const method of ["ReceiveMessage", "UserJoined", "UserLeft", "ReceiveGroupMessage", "ReceiveNotification"]) {
      this.connection.on(method, (...args) => this.record(method, args));
    }
  }

  record(method, args) {
    this.events.push({ method, args });
    this.waiters = this.waiters.filter((w) => !w());
  }

  async start() {
    await within(this.connection.start(), `${this.user} to connect`);
    return this;
  }

  /** Waits for an event matching `test`, returning it. */
  waitFor(what, test) {
    const found = () => this.events.find(test);
    const hit = found();
    if (hit) return Promise.resolve(hit);
    return within(
      new Promise((resolve) => {
        this.waiters.push(() => {
          const e = found();
          if (e) resolve(e);
          return Boolean(e);
        });
      }),
      `${this.user}: ${what}`,
    );
  }

  count(test) {
    return this.events.filter(test).length;
  }

  stop() {
    return this.connection.stop();
  }
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const unique = `${Date.now()}`;
const scenarios = [];
function scenario(name, body, { twoNodes = false } = {}) {
  scenarios.push({ name, body, twoNodes });
}
// One node when both URLs are the same: the scenarios that need two are skipped.
const ONE_NODE = A === B;

scenario("broadcast crosses nodes", async () => {
  const alice = await new Client(A, `alice-${unique}`).start();
  const bob = await new Client(B, `bob-${unique}`).start();
  await alice.connection.invoke("SendMessage", "hello from A");
  const got = await bob.waitFor("the broadcast", (e) => e.method === "ReceiveMessage" && e.args[1] === "hello from A");
  check(got.args[0] === alice.user, `the sender is named ${got.args[0]}`);
  await alice.waitFor("its own broadcast", (e) => e.method === "ReceiveMessage" && e.args[1] === "hello from A");
  await Promise.all([alice.stop(), bob.stop()]);
});

scenario("groups: join on one node, message from the other", async () => {
  const group = `room-${unique}`;
  const alice = await new Client(A, `galice-${unique}`).start();
  const bob = await new Client(B, `gbob-${unique}`).start();
  await bob.connection.invoke("JoinGroup", group);
  await bob.waitFor("its own join", (e) => e.method === "UserJoined" && e.args[0] === group);
  await alice.connection.invoke("SendToGroup", group, "to the room");
  const got = await bob.waitFor("the group message", (e) => e.method === "ReceiveGroupMessage");
  check(got.args[0] === group && got.args[1] === alice.user && got.args[2] === "to the room", `group message ${JSON.stringify(got.args)}`);
  // Alice is not in the group: a broadcast she sends after it reaches her, the group message did not.
  await alice.connection.invoke("SendMessage", `marker-${group}`);
  await alice.waitFor("the marker", (e) => e.method === "ReceiveMessage" && e.args[1] === `marker-${group}`);
  check(alice.count((e) => e.method === "ReceiveGroupMessage") === 0, "a non-member received the group message");
  await bob.connection.invoke("LeaveGroup", group);
  await alice.connection.invoke("SendToGroup", group, "after leaving");
  await bob.connection.invoke("SendMessage", `marker2-${group}`);
  await bob.waitFor("the second marker", (e) => e.method === "ReceiveMessage" && e.args[1] === `marker2-${group}`);
  check(bob.count((e) => e.method === "ReceiveGroupMessage") === 1, "a member that left still received group messages");
  await Promise.all([alice.stop(), bob.stop()]);
});

scenario("a user's connections on two nodes all receive", async () => {
  const user = `carol-${unique}`;
  const onA = await new Client(A, user).start();
  const onB = await new Client(B, user).start();
  const sender = await new Client(A, `sender-${unique}`).start();
  await sender.connection.invoke("SendToUser", user, "for both");
  await onA.waitFor("the notification on A", (e) => e.method === "ReceiveNotification" && e.args[1] === "for both");
  const got = await onB.waitFor("the notification on B", (e) => e.method === "ReceiveNotification" && e.args[1] === "for both");
  check(got.args[0] === sender.user, `from ${got.args[0]}`);
  await Promise.all([onA.stop(), onB.stop(), sender.stop()]);
});

scenario("a direct message waits for an offline user, and arrives once", async () => {
  const user = `dave-${unique}`;
  const sender = await new Client(A, `dsender-${unique}`).start();
  await sender.connection.invoke("SendToUser", user, "while you were away");
  const dave = await new Client(B, user).start();
  await dave.waitFor("the stored message", (e) => e.method === "ReceiveNotification" && e.args[1] === "while you were away");
  await dave.stop();
  const again = await new Client(A, user).start();
  await again.connection.invoke("SendToUser", user, "marker");
  await again.waitFor("the marker", (e) => e.method === "ReceiveNotification" && e.args[1] === "marker");
  check(again.count((e) => e.args[1] === "while you were away") === 0, "the stored message was delivered twice");
  await Promise.all([sender.stop(), again.stop()]);
});

scenario("presence spans nodes", async () => {
  const onA = await new Client(A, `pa-${unique}`).start();
  const onB = await new Client(B, `pb-${unique}`).start();
  const users = await within(onA.connection.invoke("GetOnlineUsers"), "GetOnlineUsers");
  check(users.includes(onA.user) && users.includes(onB.user), `online users ${JSON.stringify(users)}`);
  // The official client's stop() resolves before the server has answered its close. The
  // server unregisters a connection before it sends its close frame, so once the socket (the
  // ws library's, under the client) has closed, presence no longer lists the user.
  const socket = onB.connection.connection.transport._webSocket;
  const socketClosed = new Promise((resolve) => socket.once("close", resolve));
  await onB.stop();
  await within(socketClosed, "the server to close the socket");
  const after = await within(onA.connection.invoke("GetOnlineUsers"), "GetOnlineUsers");
  check(!after.includes(onB.user), `a user who left is still online: ${JSON.stringify(after)}`);
  await onA.stop();
});

scenario("completions carry results and errors", async () => {
  const c = await new Client(A, `errors-${unique}`).start();
  const none = await c.connection.invoke("SendMessage", "x");
  check(none === null || none === undefined, `a void method returned ${JSON.stringify(none)}`);
  await c.connection.invoke("NoSuchMethod").then(
    () => check(false, "an unknown method succeeded"),
    (e) => check(/Unknown hub method 'NoSuchMethod'/.test(e.message), e.message),
  );
  await c.connection.invoke("SendMessage").then(
    () => check(false, "a call without its argument succeeded"),
    (e) => check(/expects 1/.test(e.message), e.message),
  );
  await c.connection.invoke("SendMessage", 42).then(
    () => check(false, "a number accepted as a string"),
    (e) => check(/wrong type/.test(e.message), e.message),
  );
  await c.connection.invoke("JoinGroup", "x".repeat(300)).then(
    () => check(false, "an overlong group name accepted"),
    (e) => check(/group/i.test(e.message), e.message),
  );
  // The connection survives every error.
  check(c.connection.state === signalR.HubConnectionState.Connected, `state ${c.connection.state}`);
  await c.stop();
});

scenario("client-to-server streams: a Subject's items reach every node, in order", async () => {
  for (const msgpack of [false, true]) {
    const uploader = await new Client(A, `uploader-${msgpack}-${unique}`, { msgpack }).start();
    const reader = await new Client(B, `reader-${msgpack}-${unique}`).start();
    const subject = new signalR.Subject();
    const sent = uploader.connection.invoke("UploadMessages", subject);
    const items = ["one", "two", "three"].map((w) => `${w}-${msgpack}-${unique}`);
    for (const item of items) subject.next(item);
    subject.complete();
    const count = await within(sent, "the upload's completion");
    check(Number(count) === items.length, `the upload reported ${count}`);
    await reader.waitFor("the last streamed message", (e) => e.method === "ReceiveMessage" && e.args[1] === items[2]);
    const seen = reader.events.filter((e) => e.method === "ReceiveMessage" && items.includes(e.args[1])).map((e) => e.args[1]);
    check(JSON.stringify(seen) === JSON.stringify(items), `order ${JSON.stringify(seen)}`);
    check(seen.every((_, i) => reader.events.find((e) => e.args[1] === items[i]).args[0] === uploader.user), "sender names");
    // A stream the client ends with an error fails the call with it.
    const broken = new signalR.Subject();
    const failing = uploader.connection.invoke("UploadMessages", broken);
    broken.next(`before the error-${msgpack}-${unique}`);
    broken.error(new Error("upload interrupted"));
    await within(failing.then(
      () => check(false, "an errored stream completed normally"),
      (e) => check(/upload interrupted/.test(e.message), e.message),
    ), "the failed upload's completion");
    await Promise.all([uploader.stop(), reader.stop()]);
  }
});

scenario("client results: a hub method gets the value an .on handler returns, across nodes", async () => {
  const asker = await new Client(A, `asker-${unique}`).start();
  const oracle = await new Client(B, `oracle-${unique}`).start();
  oracle.connection.on("Ask", (from, question) => {
    if (question === "fail") throw new Error("cannot answer");
    return `${from} asked: ${question}`;
  });
  const answer = await within(asker.connection.invoke("Ask", oracle.user, "meaning?"), "an answer");
  check(answer === `${asker.user} asked: meaning?`, `answer ${JSON.stringify(answer)}`);
  await asker.connection.invoke("Ask", oracle.user, "fail").then(
    () => check(false, "a failing handler produced a result"),
    (e) => check(/cannot answer/.test(e.message), e.message),
  );
  await asker.connection.invoke("Ask", `nobody-${unique}`, "?").then(
    () => check(false, "asked a user who is not connected"),
    (e) => check(/not connected/.test(e.message), e.message),
  );
  await Promise.all([asker.stop(), oracle.stop()]);
});

scenario("MessagePack and JSON clients talk across nodes", async () => {
  const packed = await new Client(B, `packed-${unique}`, { msgpack: true }).start();
  const plain = await new Client(A, `plain-${unique}`).start();
  // The pinned client keeps its protocol in `_protocol`.
  check(packed.connection._protocol.name === "messagepack", `protocol ${packed.connection._protocol.name}`);
  await plain.connection.invoke("SendMessage", "to msgpack \u001e ünïcode");
  await packed.waitFor("a JSON client's broadcast", (e) => e.method === "ReceiveMessage" && e.args[1] === "to msgpack \u001e ünïcode");
  await packed.connection.invoke("SendMessage", "from msgpack");
  await plain.waitFor("a MessagePack client's broadcast", (e) => e.method === "ReceiveMessage" && e.args[1] === "from msgpack" && e.args[0] === packed.user);
  const users = await packed.connection.invoke("GetOnlineUsers");
  check(users.includes(packed.user) && users.includes(plain.user), `online users ${JSON.stringify(users)}`);
  await packed.connection.invoke("NoSuchMethod").then(
    () => check(false, "an unknown method succeeded"),
    (e) => check(/Unknown hub method 'NoSuchMethod'/.test(e.message), e.message),
  );
  packed.connection.on("Ask", (from, question) => `packed answer to ${question}`);
  const answer = await within(plain.connection.invoke("Ask", packed.user, "q?"), "a client result over MessagePack");
  check(answer === "packed answer to q?", `answer ${JSON.stringify(answer)}`);
  await Promise.all([packed.stop(), plain.stop()]);
});

scenario("stateful reconnect: a dropped socket resumes and misses nothing", async () => {
  const sender = await new Client(A, `sr-sender-${unique}`).start();
  const c = new Client(B, `sr-${unique}`, { stateful: true });
  let closed = false;
  c.connection.onclose(() => { closed = true; });
  await c.start();
  const id = c.connection.connectionId;
  await sender.connection.invoke("SendMessage", "before the drop");
  await c.waitFor("the first message", (e) => e.method === "ReceiveMessage" && e.args[1] === "before the drop");
  // Cut the TCP connection under the client (the ws library's socket), as a network failure would.
  c.connection.connection.transport._webSocket._socket.destroy();
  for (let i = 0; i < 20; i++) await sender.connection.invoke("SendMessage", `during ${i}`);
  await c.waitFor("the last message sent while away", (e) => e.method === "ReceiveMessage" && e.args[1] === "during 19");
  for (let i = 0; i < 20; i++) {
    const n = c.count((e) => e.method === "ReceiveMessage" && e.args[1] === `during ${i}`);
    check(n === 1, `message ${i} arrived ${n} times`);
  }
  check(c.count((e) => e.args[1] === "before the drop") === 1, "a message before the drop arrived twice");
  check(!closed && c.connection.connectionId === id, "the client saw a new connection instead of a resume");
  const users = await within(c.connection.invoke("GetOnlineUsers"), "an invocation after the resume");
  check(users.includes(c.user), `online users ${JSON.stringify(users)}`);
  await Promise.all([sender.stop(), c.stop()]);
});

/** A TCP load balancer that sends each new connection to the next of `bases` in turn. */
async function roundRobin(bases) {
  const targets = bases.map((base) => new URL(base));
  const routed = [];
  const server = createServer((socket) => {
    const target = targets[routed.length % targets.length];
    routed.push(target.port);
    const upstream = connect(Number(target.port), target.hostname);
    const close = () => {
      socket.destroy();
      upstream.destroy();
    };
    for (const end of [socket, upstream]) {
      end.on("error", close);
      end.on("close", close);
    }
    socket.pipe(upstream);
    upstream.pipe(socket);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, routed, close: () => server.close() };
}

scenario("stateful reconnect behind a round-robin load balancer: the resume reaches the connection's node", async () => {
  const lb = await roundRobin([A, B]);
  const sender = await new Client(A, `lb-sender-${unique}`).start();
  const c = new Client(lb.url, `lb-${unique}`, { stateful: true });
  let closed = false;
  c.connection.onclose(() => { closed = true; });
  await c.start();
  const id = c.connection.connectionId;
  const before = lb.routed.length;
  await sender.connection.invoke("SendMessage", "lb before the drop");
  await c.waitFor("the first message", (e) => e.method === "ReceiveMessage" && e.args[1] === "lb before the drop");
  c.connection.connection.transport._webSocket._socket.destroy();
  for (let i = 0; i < 20; i++) await sender.connection.invoke("SendMessage", `lb during ${i}`);
  await c.waitFor("the last message sent while away", (e) => e.method === "ReceiveMessage" && e.args[1] === "lb during 19");
  for (let i = 0; i < 20; i++) {
    const n = c.count((e) => e.method === "ReceiveMessage" && e.args[1] === `lb during ${i}`);
    check(n === 1, `message ${i} arrived ${n} times`);
  }
  check(c.count((e) => e.args[1] === "lb before the drop") === 1, "a message before the drop arrived twice");
  check(!closed && c.connection.connectionId === id, "the client saw a new connection instead of a resume");
  check(
    lb.routed.length > before && lb.routed[before] !== lb.routed[before - 1],
    `the resumed socket went to the node holding the connection, not another one: ${lb.routed}`,
  );
  const users = await within(c.connection.invoke("GetOnlineUsers"), "an invocation after the resume");
  check(users.includes(c.user), `online users ${JSON.stringify(users)}`);
  await Promise.all([sender.stop(), c.stop()]);
  lb.close();
}, { twoNodes: true });

scenario("an invalid token is refused", async () => {
  const bad = new signalR.HubConnectionBuilder()
    .withUrl(`${A}/hubs/chat`, { accessTokenFactory: () => "not-a-token" })
    .configureLogging(signalR.LogLevel.None)
    .build();
  await bad.start().then(
    () => check(false, "connected with an invalid token"),
    (e) => check(/401/.test(e.message) || /Unauthorized/i.test(e.message), e.message),
  );
});

scenario("automatic reconnect after a server restart", async () => {
  const watcher = await new Client(A, `watch-${unique}`).start();
  const c = new Client(B, `phoenix-${unique}`, { reconnect: true });
  const reconnected = new Promise((resolve) => c.connection.onreconnected(resolve));
  await c.start();
  console.log("RESTART B");
  const reply = await within(nextStdinLine(), "the harness to restart node B", 60_000);
  check(reply === "RESTARTED", `harness said ${reply}`);
  await within(reconnected, "the client to reconnect", 30_000);
  await watcher.connection.invoke("SendMessage", "after the restart");
  await c.waitFor("a broadcast after reconnecting", (e) => e.method === "ReceiveMessage" && e.args[1] === "after the restart");
  await Promise.all([watcher.stop(), c.stop()]);
}, { twoNodes: true });

let failed = 0;
let skipped = 0;
for (const { name, body, twoNodes } of scenarios) {
  if (twoNodes && ONE_NODE) {
    skipped += 1;
    console.log(`SKIP ${name}: needs two nodes`);
    continue;
  }
  const started = Date.now();
  try {
    await body();
    console.log(`PASS ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${name}: ${e.stack ?? e}`);
  }
}
console.log(`interop: ${scenarios.length - failed - skipped} passed, ${failed} failed, ${skipped} skipped`);
lines.close();
process.exit(failed ? 1 : 0);
