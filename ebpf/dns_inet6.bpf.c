/* DNS capture for AF_INET6 sockets asking an IPv4 server through its
 * v4-mapped address (::ffff:a.b.c.d), as dual-stack runtimes (the JVM's own
 * DNS client, for one) do. The kernel runs the inet6/udp6 hooks for those
 * sockets, never the IPv4 ones; the packets are IPv4, so Istio's iptables
 * rules capture them. Same policy and origins as the IPv4 hooks
 * (dns_sendmsg.bpf.c); native IPv6 servers are not taken over (ip6tables
 * keeps them). getpeername6 is one program with the mesh's peer names
 * (getpeername.bpf.c), which calls dns_show_origin6 first. */
#include "merbridge.h"

#define V4MAPPED_PREFIX_HOST 0x0000ffff   /* third 32-bit word of ::ffff:0:0/96 */

static __always_inline int is_v4mapped(struct bpf_sock_addr *ctx)
{
    return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == bpf_htonl(V4MAPPED_PREFIX_HOST);
}

static __always_inline int is_dns_proxy6(struct bpf_sock_addr *ctx)
{
    return is_v4mapped(ctx) && ctx->user_ip6[3] == bpf_htonl(MB_DNS_PROXY_IP_HOST)
        && ctx->user_port == bpf_htons(MB_DNS_PROXY_PORT);
}

static __always_inline void set_v4mapped(struct bpf_sock_addr *ctx, __u32 ip_net, __u16 port)
{
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = bpf_htonl(V4MAPPED_PREFIX_HOST);
    ctx->user_ip6[3] = ip_net;
    ctx->user_port = bpf_htons(port);
}

static __always_inline int dns_redirect6(struct bpf_sock_addr *ctx, __u32 counter)
{
    if (!is_v4mapped(ctx))
        return 0;
    __u32 ip_net = ctx->user_ip6[3];
    if (dns_take(ctx, bpf_get_netns_cookie(ctx), ip_net, bpf_ntohs((__u16)ctx->user_port)) != 0)
        return 0;
    set_v4mapped(ctx, bpf_htonl(MB_DNS_PROXY_IP_HOST), MB_DNS_PROXY_PORT);
    dns_count(counter);
    return 1;
}

/* Called first by cgroup/connect6 (sock6_connect, connect.bpf.c) for TCP
 * and connected UDP; returns 1 when the destination now is the DNS proxy. */
static __always_inline int dns_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol == IPPROTO_TCP)
        return dns_redirect6(ctx, DNS_CNT_TCP_CONNECT);
    if (ctx->protocol == IPPROTO_UDP)
        return dns_redirect6(ctx, DNS_CNT_UDP_CONNECT);
    return 0;
}

int dns_sendmsg6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol == IPPROTO_UDP)
        dns_redirect6(ctx, DNS_CNT_UDP_SENDMSG);
    return 1;
}

/* recvmsg6, and getpeername6 (sock6_getpeername in getpeername.bpf.c): the
 * proxy's address back to the server's. Returns 1 when it was rewritten. */
static __always_inline int dns_show_origin6(struct bpf_sock_addr *ctx, __u32 counter)
{
    if (!is_dns_proxy6(ctx))
        return 0;
    __u64 cookie = socket_cookie64(ctx);
    struct dns_origin *origin = dns_origins.lookup(&cookie);
    if (!origin)
        return 0;
    set_v4mapped(ctx, origin->ip, origin->port);
    dns_count(counter);
    return 1;
}

int dns_recvmsg6(struct bpf_sock_addr *ctx)
{
    dns_show_origin6(ctx, DNS_CNT_REPLY_SOURCE);
    return 1;
}
