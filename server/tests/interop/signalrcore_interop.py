"""signalrcore, the most used Python SignalR client (pinned in requirements.txt), against
backplane-server: negotiate version 0, the JSON hub protocol, broadcast order, groups, users,
results and errors. NODE_A and NODE_B are the nodes' base URLs (the same one for a single
node); TOKEN_ADA and TOKEN_BOB are the users' access tokens. Prints one line per scenario and
exits non-zero on the first failure; every wait is bounded."""

import os
import queue
import sys
import threading

from signalrcore.hub_connection_builder import HubConnectionBuilder

WAIT = 15.0


class Client:
    """One connection, with every message it receives queued by target."""

    def __init__(self, base, token):
        self.inbox = {}
        self.lock = threading.Lock()
        self.errors = queue.Queue()
        self.opened = threading.Event()
        self.hub = (
            HubConnectionBuilder()
            .with_url(base + "/hubs/chat", options={"access_token_factory": lambda: token})
            .build()
        )
        self.hub.on_open(self.opened.set)
        self.hub.on_error(self.errors.put)
        for target in ("ReceiveMessage", "ReceiveGroupMessage", "ReceiveNotification", "UserJoined"):
            self.hub.on(target, self._handler(target))

    def _handler(self, target):
        def handle(arguments):
            self.messages(target).put(arguments)

        return handle

    def messages(self, target):
        with self.lock:
            return self.inbox.setdefault(target, queue.Queue())

    def start(self):
        self.hub.start()
        if not self.opened.wait(WAIT):
            raise AssertionError("the connection did not open")

    def next(self, target):
        try:
            return self.messages(target).get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no {target} within {WAIT} s") from None

    def call(self, method, arguments):
        """Invokes and waits for the completion's result."""
        done = queue.Queue()
        self.hub.send(method, arguments, on_invocation=done.put)
        try:
            return done.get(timeout=WAIT).result
        except queue.Empty:
            raise AssertionError(f"no completion of {method} within {WAIT} s") from None

    def stop(self):
        self.hub.stop()


def main():
    a_url, b_url = os.environ["NODE_A"], os.environ["NODE_B"]
    ada = Client(a_url, os.environ["TOKEN_ADA"])
    bob = Client(b_url, os.environ["TOKEN_BOB"])
    ada.start()
    bob.start()
    print("ok negotiate (version 0) and handshake", flush=True)

    # Broadcast order: 50 messages from ada reach bob in the order sent.
    for i in range(50):
        ada.call("SendMessage", [f"m{i}"])
    got = [bob.next("ReceiveMessage") for _ in range(50)]
    expected = [["py-ada", f"m{i}"] for i in range(50)]
    assert got == expected, f"broadcast order: {got[:5]}..."
    print("ok broadcast order", flush=True)

    # Groups: bob joins, ada sends to the group, bob gets it.
    bob.call("JoinGroup", ["pyroom"])
    assert bob.next("UserJoined") == ["pyroom", "py-bob"]
    ada.call("SendToGroup", ["pyroom", "to the room"])
    assert bob.next("ReceiveGroupMessage") == ["pyroom", "py-ada", "to the room"]
    print("ok groups", flush=True)

    # Users: a direct message reaches the user's connection.
    ada.call("SendToUser", ["py-bob", "just you"])
    assert bob.next("ReceiveNotification") == ["py-ada", "just you"]
    print("ok users", flush=True)

    # Results: the hub method's return value.
    online = ada.call("GetOnlineUsers", [])
    assert "py-ada" in online and "py-bob" in online, f"online: {online}"
    print("ok results", flush=True)

    # Errors: an unknown method gets an error completion, and the connection stays usable.
    ada.hub.send("NoSuchMethod", [])
    try:
        error = ada.errors.get(timeout=WAIT)
    except queue.Empty:
        raise AssertionError("no error completion for an unknown method") from None
    assert "NoSuchMethod" in (error.error or ""), f"error: {error.error}"
    assert "py-ada" in ada.call("GetOnlineUsers", [])
    print("ok errors", flush=True)

    ada.stop()
    bob.stop()
    print("signalrcore interop: all passed", flush=True)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as failure:
        print(f"FAIL {failure}", flush=True)
        sys.exit(1)
