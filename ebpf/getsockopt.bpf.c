/* cgroup/getsockopt: answer a proxy's getsockopt(SOL_IP, SO_ORIGINAL_DST) for
 * connections we redirected; every other call is left alone. */
#include "merbridge.h"

int sockopt_original_dst(struct bpf_sockopt *ctx)
{
    if (ctx->level != SOL_IP_LEVEL || ctx->optname != SO_ORIGINAL_DST_OPT)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->family != AF_INET)
        return 1;

    /* The proxy holds the accepted (server) end; the record is keyed by the client's view. */
    struct sock_tuple client = {
        .local_ip = sk->dst_ip4,
        .remote_ip = sk->src_ip4,
        .local_port = bpf_ntohs(sk->dst_port),
        .remote_port = (__u16)sk->src_port,
    };
    struct sockaddr_in *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end)
        return 1;

    struct original_dst *dst = original_dst.lookup(&client);
    if (dst) {
        sa->sin_family = AF_INET;
        sa->sin_addr.s_addr = dst->ip;
        sa->sin_port = bpf_htons(dst->port);
        ctx->optlen = sizeof(*sa);
        /* Keep clang from merging the two 32-bit context stores into one
         * 64-bit store, which the verifier rejects. */
        __asm__ __volatile__("" ::: "memory");
        ctx->retval = 0;
        count(CNT_ORIGINAL_DST_ANSWERED, 1);
        return 1;
    }

    /* Not ours: the kernel's (conntrack's) answer stands, unless on a mesh
     * listener it is an error or names the listener itself. That happens when
     * we lost a connection's record (its 4-tuple changed under us, or it was
     * never ours): the proxy would connect to itself, again and again. Failing
     * the call does not help (proxies then fall back to the local address, the
     * same loop), so the answer is 127.0.0.1:0, where nothing can listen: the
     * proxy's connect is refused at once and it drops this one connection. */
    int on_listener = client.remote_port == MESH_OUTBOUND_PORT || client.remote_port == MESH_INBOUND_PORT;
    int names_itself = ctx->retval == 0 && sa->sin_addr.s_addr == sk->src_ip4 &&
                       bpf_ntohs(sa->sin_port) == client.remote_port;
    if (on_listener && (ctx->retval != 0 || names_itself)) {
        sa->sin_family = AF_INET;
        sa->sin_addr.s_addr = bpf_htonl(0x7f000001);
        sa->sin_port = 0;
        ctx->optlen = sizeof(*sa);
        __asm__ __volatile__("" ::: "memory");   /* see above */
        ctx->retval = 0;
        count(CNT_ORIGINAL_DST_REFUSED, 1);
        return 1;
    }
    count(CNT_ORIGINAL_DST_MISS, 1);
    return 1;
}
