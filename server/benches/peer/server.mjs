// The benchmark's peer: Socket.IO 4 serving the chat's SendMessage -> ReceiveMessage broadcast,
// scaled out with @socket.io/postgres-adapter when DATABASE_URL is set. Prints its address on
// the first line of stdout once it listens.
import { createServer } from "node:http";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/postgres-adapter";
import pg from "pg";

const port = Number(process.env.PORT ?? 0);
const httpServer = createServer();
const io = new Server(httpServer, { transports: ["websocket"], perMessageDeflate: false });

if (process.env.DATABASE_URL) {
  const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL });
  // The table the adapter's README asks its users to create.
  await pool.query(`CREATE TABLE IF NOT EXISTS socket_io_attachments (
      id          bigserial UNIQUE,
      created_at  timestamptz DEFAULT NOW(),
      payload     bytea
  )`);
  io.adapter(createAdapter(pool));
}

io.on("connection", (socket) => {
  const user = String(socket.handshake.query.user ?? socket.id);
  socket.on("SendMessage", (message, ack) => {
    io.emit("ReceiveMessage", user, message);
    if (typeof ack === "function") ack();
  });
});

httpServer.listen(port, "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${httpServer.address().port}`);
});
