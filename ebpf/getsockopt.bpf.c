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

    /* Not ours: the kernel's (conntrack's) answer stands, unless it names the
     * socket's own listener. That happens when a redirected connection's
     * 4-tuple changed under us (conntrack remapping a source port): the proxy
     * would connect to itself in a loop. Failing this one call makes it drop
     * one connection instead. */
    if ((client.remote_port == MESH_OUTBOUND_PORT || client.remote_port == MESH_INBOUND_PORT) &&
        ctx->retval == 0 && sa->sin_addr.s_addr == sk->src_ip4 &&
        bpf_ntohs(sa->sin_port) == client.remote_port) {
        count(CNT_ORIGINAL_DST_REFUSED, 1);
        return 0;
    }
    count(CNT_ORIGINAL_DST_MISS, 1);
    return 1;
}
