/* The sock_recv_length tracepoint (net/socket.c, sock_recvmsg_nosec: every
 * recvmsg, read and recvmmsg of a socket, with the bytes it returned): count
 * the bytes a spliced socket's reader took, as the fexit programs of
 * tcp_bpf_recvmsg.bpf.c do, on kernels that refuse fexit programs.
 *
 * Why a second way: tracing programs (fexit) need the kernel's BPF
 * trampolines, which some kernels refuse to load (this project's machine:
 * EPERM under lockdown), while a raw tracepoint program is the older, plain
 * kind they still take. The tracepoint exists since 6.4; where neither loads,
 * the agent falls back (datapath.BACKLOG_FALLBACK_ENV).
 *
 * Its cost: it runs on every socket read on the node, not only on spliced
 * sockets (the fexit programs run only on sockets in a sockmap): a read of
 * the socket's head and one or two hash lookups per read. The loader
 * attaches only one of the two, so no read is counted twice. */
#include "merbridge.h"
#include "reader_progress.h"

/* TP_PROTO(struct sock *sk, int ret, int flags) */
RAW_TRACEPOINT_PROBE(sock_recv_length)
{
    reader_took((struct sock *)ctx->args[0], (int)ctx->args[2], (int)ctx->args[1]);
    return 0;
}
