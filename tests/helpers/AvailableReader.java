/*
 * A Java server that sizes its reads with InputStream.available(), as Java
 * apps do; available() is ioctl(FIONREAD) on the socket (NioSocketImpl and
 * SocketChannelImpl both call Net.available). If FIONREAD says 0 while bytes
 * are queued, such an app stalls. Run with the JRE alone (single-file source
 * launch):
 *
 *     java AvailableReader.java --select-port 9301 --stream-port 9302 [--stall-ms 2000]
 *
 * It prints "ready" once both ports listen, and speaks fionread_app.py's
 * protocol, so `fionread_app.py client` drives it: the client sends
 * "up N down M\n" and N pattern bytes; this server reads them, answers its
 * counts as one JSON line, sends M pattern bytes and waits for the client to
 * close. The two ports read the upload in two ways:
 *
 * - select: a non-blocking SocketChannel and a Selector (level-triggered).
 *   At every readable moment: n = available(); read at most n bytes (all of
 *   the buffer when n is 0). A moment where available() said 0 and the read
 *   returned data is a lie, counted exactly ("zero_while_data"): readiness
 *   came first, so the bytes were queued when available() was asked.
 * - stream: a plain blocking Socket read the way polling apps read it:
 *   n = available(); if n > 0 read n bytes, else sleep 1 ms and ask again.
 *   Where available() stays 0 for --stall-ms while bytes remain, the app
 *   would stall for good; this one then tries a read with a 1 ms timeout:
 *   data returned at once means FIONREAD hid queued bytes (counted in
 *   "zero_while_data", the stall in "stalls") and it goes on, so the test
 *   still ends; no data means the sender really went quiet.
 *
 * The payload is fionread_app.py's pattern (a block of prime length
 * repeated), checked per read: a reordered or lost byte shows in
 * "corrupt_reads".
 */

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.net.SocketTimeoutException;
import java.nio.ByteBuffer;
import java.nio.channels.SelectionKey;
import java.nio.channels.Selector;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;

public class AvailableReader {
    static final int BLOCK_LEN = 1048573;          // fionread_app.py's _BLOCK_LEN
    static final byte[] BLOCK = new byte[2 * BLOCK_LEN];
    static final int BUFFER = 1 << 19;             // < BLOCK_LEN, so one read is one slice of BLOCK
    static final int SEND_CHUNK = 1 << 16;
    static long stallMs = 2000;

    static {
        for (int i = 0; i < BLOCK_LEN; i++) {
            BLOCK[i] = (byte) ((i * 7 + i / 251) & 0xFF);
        }
        System.arraycopy(BLOCK, 0, BLOCK, BLOCK_LEN, BLOCK_LEN);
    }

    /** The request line, then the payload checked against the pattern. */
    static final class Upload {
        final StringBuilder header = new StringBuilder();
        boolean headerDone;
        long up = -1, down, offset, readable, zeroWhileData, corrupt, stalls;
        boolean stalled;

        boolean done() {
            return headerDone && offset >= up;
        }

        long remaining() {
            return headerDone ? up - offset : Long.MAX_VALUE;
        }

        void feed(byte[] b, int off, int len) throws IOException {
            int end = off + len;
            while (!headerDone && off < end) {
                char c = (char) b[off++];
                if (c == '\n') {
                    String[] words = header.toString().trim().split(" ");
                    if (words.length != 4 || !words[0].equals("up") || !words[2].equals("down")) {
                        throw new IOException("bad request line: " + header);
                    }
                    up = Long.parseLong(words[1]);
                    down = Long.parseLong(words[3]);
                    headerDone = true;
                } else {
                    header.append(c);
                }
            }
            int n = end - off;
            if (n <= 0) {
                return;
            }
            if (offset + n > up) {
                throw new IOException("client sent more than " + up + " bytes");
            }
            int start = (int) (offset % BLOCK_LEN);
            if (!Arrays.equals(b, off, end, BLOCK, start, start + n)) {
                corrupt++;
            }
            offset += n;
        }

        String json(String reader) {
            return "{\"reader\": \"" + reader + "\", \"bytes\": " + Math.max(offset, 0) + ", \"readable\": " + readable
                    + ", \"zero_while_data\": " + zeroWhileData + ", \"corrupt_reads\": " + corrupt
                    + ", \"stalls\": " + stalls + ", \"stalled\": " + stalled + "}\n";
        }
    }

    static void answer(OutputStream out, Upload upload, String reader) throws IOException {
        out.write(upload.json(reader).getBytes(StandardCharsets.US_ASCII));
        long sent = 0;
        while (sent < upload.down) {
            int n = (int) Math.min(SEND_CHUNK, upload.down - sent);
            int start = (int) (sent % BLOCK_LEN);
            out.write(BLOCK, start, n);
            sent += n;
        }
        out.flush();
    }

    static void waitForClose(InputStream in) throws IOException {
        byte[] sink = new byte[4096];
        while (in.read(sink) >= 0) {
            // the client closes first, after reading everything
        }
    }

    // --- select: readiness, then available(), then a non-blocking read ---------------------

    static void serveSelect(SocketChannel ch) throws IOException {
        Upload upload = new Upload();
        ch.configureBlocking(false);
        // available() of the channel's stream works in non-blocking mode (only its reads need blocking)
        InputStream stream = ch.socket().getInputStream();
        ByteBuffer buf = ByteBuffer.allocate(BUFFER);
        try (Selector selector = Selector.open()) {
            ch.register(selector, SelectionKey.OP_READ);
            while (!upload.done()) {
                if (selector.select(Math.max(stallMs * 10, 30000)) == 0) {
                    upload.stalled = true;      // no readiness at all: the sender went quiet
                    break;
                }
                selector.selectedKeys().clear();
                int available = stream.available();
                buf.clear();
                long cap = Math.min(buf.capacity(), upload.remaining());
                buf.limit((int) (available > 0 ? Math.min(available, cap) : cap));
                int n = ch.read(buf);
                if (n < 0) {
                    break;
                }
                if (n == 0) {
                    continue;                   // a wake-up without data
                }
                upload.readable++;
                if (available == 0) {
                    upload.zeroWhileData++;
                }
                upload.feed(buf.array(), 0, n);
            }
        }
        ch.configureBlocking(true);
        answer(ch.socket().getOutputStream(), upload, "select");
        ch.shutdownOutput();
        waitForClose(ch.socket().getInputStream());
    }

    // --- stream: a blocking Socket polled with available() ------------------------------------

    static void serveStream(Socket sock) throws IOException, InterruptedException {
        Upload upload = new Upload();
        InputStream in = sock.getInputStream();
        byte[] buf = new byte[BUFFER];
        long quietSince = System.nanoTime();
        while (!upload.done()) {
            int cap = (int) Math.min(buf.length, upload.remaining());
            int available = in.available();
            int n;
            if (available > 0) {
                n = in.read(buf, 0, Math.min(available, cap));
            } else if ((System.nanoTime() - quietSince) / 1_000_000 < stallMs) {
                Thread.sleep(1);
                continue;
            } else {
                // available() said 0 for stallMs: an app trusting it would wait for ever
                upload.stalls++;
                sock.setSoTimeout(1);
                try {
                    n = in.read(buf, 0, cap);
                    upload.zeroWhileData++;     // the bytes were queued while available() said 0
                } catch (SocketTimeoutException quiet) {
                    sock.setSoTimeout((int) Math.max(stallMs * 10, 30000));
                    try {
                        n = in.read(buf, 0, cap);   // the sender is quiet: wait for it as a blocking app would
                    } catch (SocketTimeoutException gone) {
                        upload.stalled = true;
                        break;
                    }
                }
                sock.setSoTimeout(0);
            }
            if (n < 0) {
                break;
            }
            upload.readable++;
            upload.feed(buf, 0, n);
            quietSince = System.nanoTime();
        }
        answer(sock.getOutputStream(), upload, "stream");
        sock.shutdownOutput();
        waitForClose(in);
    }

    static void report(Throwable t) {
        System.err.println("AvailableReader: " + t);
        System.err.flush();
    }

    public static void main(String[] args) throws Exception {
        int selectPort = -1, streamPort = -1;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--select-port": selectPort = Integer.parseInt(args[++i]); break;
                case "--stream-port": streamPort = Integer.parseInt(args[++i]); break;
                case "--stall-ms": stallMs = Long.parseLong(args[++i]); break;
                default: throw new IllegalArgumentException("unknown argument " + args[i]
                        + " (usage: --select-port P --stream-port P [--stall-ms MS])");
            }
        }
        if (selectPort <= 0 || streamPort <= 0) {
            throw new IllegalArgumentException("--select-port and --stream-port are required");
        }
        ServerSocketChannel selectListener = ServerSocketChannel.open();
        selectListener.bind(new InetSocketAddress("0.0.0.0", selectPort), 64);
        ServerSocket streamListener = new ServerSocket();
        streamListener.bind(new InetSocketAddress("0.0.0.0", streamPort), 64);
        Thread selectAcceptor = new Thread(() -> {
            while (true) {
                try {
                    SocketChannel ch = selectListener.accept();
                    new Thread(() -> {
                        try (ch) {
                            serveSelect(ch);
                        } catch (Exception e) {
                            report(e);
                        }
                    }).start();
                } catch (IOException e) {
                    report(e);
                    return;
                }
            }
        });
        selectAcceptor.start();
        System.out.println("ready");
        System.out.flush();
        while (true) {
            Socket sock = streamListener.accept();
            new Thread(() -> {
                try (sock) {
                    serveStream(sock);
                } catch (Exception e) {
                    report(e);
                }
            }).start();
        }
    }
}
