/* cgroup/getsockopt: answer a proxy's getsockopt(SOL_IP, SO_ORIGINAL_DST) and
 * getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) for connections we redirected;
 * every other call is left alone.
 *
 * SOL_IP gets a sockaddr_in, for IPv4 destinations only (an app's v4-mapped
 * AF_INET6 connection included: the proxy's listener accepted it as IPv4);
 * SOL_IPV6 gets a sockaddr_in6, the address as recorded (v4-mapped for IPv4). */
#include "merbridge.h"

/* The accepted (server) end's connection, as its client sees it: the key of original_dst. */
static __always_inline struct sock_tuple client_view(struct bpf_sock *sk)
{
    struct sock_tuple client = {
        .local_port = bpf_ntohs(sk->dst_port),
        .remote_port = (__u16)sk->src_port,
    };
    int inet = sk->family == AF_INET;
    ADDR_FROM_CTX(&client.local_ip, inet, sk, dst_ip4, dst_ip6);
    ADDR_FROM_CTX(&client.remote_ip, inet, sk, src_ip4, src_ip6);
    return client;
}

/* The last two stores go to the context: keep clang from merging the two
 * 32-bit stores into one 64-bit store, which the verifier rejects. */
#define ANSWER(ctx, len) do {                      \
        (ctx)->optlen = (len);                     \
        __asm__ __volatile__("" ::: "memory");     \
        (ctx)->retval = 0;                         \
    } while (0)

static __always_inline int answer_ipv4(struct bpf_sockopt *ctx, struct bpf_sock *sk)
{
    struct sockaddr_in *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end)
        return 1;
    struct sock_tuple client = client_view(sk);
    struct original_dst *dst = original_dst.lookup(&client);
    if (dst && addr_is_v4(&dst->ip)) {
        sa->sin_family = AF_INET;
        sa->sin_addr.s_addr = dst->ip.w[3];
        sa->sin_port = bpf_htons(dst->port);
        ANSWER(ctx, sizeof(*sa));
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
    int names_itself = ctx->retval == 0 && sa->sin_addr.s_addr == client.remote_ip.w[3] &&
                       bpf_ntohs(sa->sin_port) == client.remote_port;
    if (on_listener && (ctx->retval != 0 || names_itself)) {
        sa->sin_family = AF_INET;
        sa->sin_addr.s_addr = bpf_htonl(0x7f000001);
        sa->sin_port = 0;
        ANSWER(ctx, sizeof(*sa));
        count(CNT_ORIGINAL_DST_REFUSED, 1);
        return 1;
    }
    count(CNT_ORIGINAL_DST_MISS, 1);
    return 1;
}

static __always_inline int answer_ipv6(struct bpf_sockopt *ctx, struct bpf_sock *sk)
{
    struct sockaddr_in6 *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end)
        return 1;
    struct sock_tuple client = client_view(sk);
    struct original_dst *dst = original_dst.lookup(&client);
    struct addr to = {};
    __u16 port = 0;
    if (dst) {
        to = dst->ip;
        port = dst->port;
        count(CNT_ORIGINAL_DST_ANSWERED, 1);
    } else {
        /* As for IPv4 (above): never let the proxy be told its own listener;
         * [::1]:0 is refused at once. */
        int on_listener = client.remote_port == MESH_OUTBOUND_PORT || client.remote_port == MESH_INBOUND_PORT;
        int names_itself = ctx->retval == 0 && bpf_ntohs(sa->sin6_port) == client.remote_port &&
                           sa->sin6_addr.in6_u.u6_addr32[0] == client.remote_ip.w[0] &&
                           sa->sin6_addr.in6_u.u6_addr32[1] == client.remote_ip.w[1] &&
                           sa->sin6_addr.in6_u.u6_addr32[2] == client.remote_ip.w[2] &&
                           sa->sin6_addr.in6_u.u6_addr32[3] == client.remote_ip.w[3];
        if (!on_listener || (ctx->retval == 0 && !names_itself)) {
            count(CNT_ORIGINAL_DST_MISS, 1);
            return 1;
        }
        to.w[3] = bpf_htonl(1);
        count(CNT_ORIGINAL_DST_REFUSED, 1);
    }
    sa->sin6_family = AF_INET6;
    sa->sin6_port = bpf_htons(port);
    sa->sin6_flowinfo = 0;
    sa->sin6_addr.in6_u.u6_addr32[0] = to.w[0];
    sa->sin6_addr.in6_u.u6_addr32[1] = to.w[1];
    sa->sin6_addr.in6_u.u6_addr32[2] = to.w[2];
    sa->sin6_addr.in6_u.u6_addr32[3] = to.w[3];
    sa->sin6_scope_id = 0;
    ANSWER(ctx, sizeof(*sa));
    return 1;
}

int sockopt_original_dst(struct bpf_sockopt *ctx)
{
    if (ctx->optname != SO_ORIGINAL_DST_OPT)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || (sk->family != AF_INET && sk->family != AF_INET6))
        return 1;
    if (ctx->level == SOL_IP_LEVEL)
        return answer_ipv4(ctx, sk);
    if (ctx->level == SOL_IPV6_LEVEL)
        return answer_ipv6(ctx, sk);
    return 1;
}
