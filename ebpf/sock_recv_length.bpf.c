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
 * sockets (the fexit programs run only on sockets in a sockmap): every
 * process's, meshed or not, and the sidecars' own cross-node connections.
 * A socket in a sockmap has its psock in sk_user_data, so one read of that
 * pointer turns the others away before reader_took's copy of the socket's
 * head and its two hash lookups (332 ns a read here, benchmarks/results/
 * backpressure/). struct sock's layout depends on the kernel's
 * configuration: the loader reads sk_user_data's offset from the kernel's
 * BTF (SK_USER_DATA_OFFSET). Sockets that use sk_user_data for something
 * else pass the test and cost what they did before it.
 * The loader attaches only one of the two hooks, so no read is counted
 * twice. */
#include "merbridge.h"
#include "reader_progress.h"

#ifndef SK_USER_DATA_OFFSET
#error "SK_USER_DATA_OFFSET (struct sock's sk_user_data, from BTF) is passed by the loader (merbridge_py/loader.py)"
#endif

/* TP_PROTO(struct sock *sk, int ret, int flags) */
RAW_TRACEPOINT_PROBE(sock_recv_length)
{
    struct sock *sk = (struct sock *)ctx->args[0];
    int copied = (int)ctx->args[1];
    void *user_data = NULL;
    if (copied <= 0)
        return 0;
    if (bpf_probe_read_kernel(&user_data, sizeof(user_data), (char *)sk + SK_USER_DATA_OFFSET) != 0
        || !user_data)
        return 0;   /* no psock: in no sockmap, so nobody redirected into it */
    reader_took(sk, (int)ctx->args[2], copied);
    return 0;
}
