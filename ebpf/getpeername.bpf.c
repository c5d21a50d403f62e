/* cgroup/getpeername4 and cgroup/getpeername6: a socket whose connect was
 * rewritten shows the peer it asked for, as under Istio's REDIRECT rules
 * (which NAT packets and leave the socket's own view alone):
 *
 * - an app's connection sent to its proxy's outbound listener by the connect
 *   hook shows the original destination, not 127.0.0.2:15001 (or, for IPv6,
 *   [pod IPv6]:15001); AF_INET, v4-mapped AF_INET6 and native IPv6 alike;
 * - a proxy's connection whose port the connect hook moved to a same-node
 *   pod's inbound listener (--inbound-redirect ebpf) shows the port it asked;
 * - a DNS lookup sent to the DNS proxy shows the server it asked (DNS capture,
 *   ebpf/dns_sendmsg.bpf.c and dns_inet6.bpf.c).
 *
 * One program per hook, DNS first, so the order does not depend on attach
 * order; the two never meet (the DNS proxy's address is not a mesh listener).
 * Every other socket, the proxy's accepted and upstream ones included, is
 * answered by the kernel alone: only a socket the connect hook rewrote
 * carries a peer_names entry (merbridge.h). accept() runs this hook too, for
 * the address it returns; a freshly accepted socket never has an entry. */
#include "merbridge.h"

/* The DNS half for AF_INET sockets (the AF_INET6 one is dns_show_origin6):
 * returns 1 when the peer shown is now the server the lookup asked. */
static __always_inline int dns_peer_name4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != bpf_htonl(MB_DNS_PROXY_IP_HOST) || ctx->user_port != bpf_htons(MB_DNS_PROXY_PORT))
        return 0;
    __u64 cookie = socket_cookie64(ctx);
    struct dns_origin *origin = dns_origins.lookup(&cookie);
    if (!origin)
        return 0;
    ctx->user_ip4 = origin->ip;
    ctx->user_port = bpf_htons(origin->port);
    dns_count(DNS_CNT_PEER_NAME);
    return 1;
}

/* The socket's entry, when the kernel's answer is still the address the
 * connect hook sent it to. A socket can connect again after a failed attempt;
 * the connect hook deletes the entry when it leaves such a second attempt
 * alone, and this check makes sure an entry never renames any other peer. */
static __always_inline struct peer_name *rewritten(struct bpf_sock_addr *ctx, const struct addr *kernel_ip)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 0;
    struct peer_name *name = peer_names.sk_storage_get(sk, 0, 0);
    if (!name || !addr_eq(&name->redirected_ip, kernel_ip) ||
        name->redirected_port != bpf_ntohs((__u16)ctx->user_port))
        return 0;
    return name;
}

int sock4_getpeername(struct bpf_sock_addr *ctx)
{
    if (dns_peer_name4(ctx))
        return 1;
    struct addr kernel_ip = {};
    addr_set_v4(&kernel_ip, ctx->user_ip4);
    struct peer_name *name = rewritten(ctx, &kernel_ip);
    /* an AF_INET socket only ever asked for an IPv4 address */
    if (!name || !addr_is_v4(&name->asked_ip))
        return 1;
    ctx->user_ip4 = name->asked_ip.w[3];
    ctx->user_port = bpf_htons(name->asked_port);
    count(CNT_PEER_NAME, 1);
    return 1;
}

int sock6_getpeername(struct bpf_sock_addr *ctx)
{
    if (dns_show_origin6(ctx, DNS_CNT_PEER_NAME))
        return 1;
    struct addr kernel_ip = {};
    kernel_ip.w[0] = ctx->user_ip6[0];
    kernel_ip.w[1] = ctx->user_ip6[1];
    kernel_ip.w[2] = ctx->user_ip6[2];
    kernel_ip.w[3] = ctx->user_ip6[3];
    struct peer_name *name = rewritten(ctx, &kernel_ip);
    if (!name)
        return 1;
    /* v4-mapped for an IPv4 destination: the form the socket connected to */
    ctx->user_ip6[0] = name->asked_ip.w[0];
    ctx->user_ip6[1] = name->asked_ip.w[1];
    ctx->user_ip6[2] = name->asked_ip.w[2];
    ctx->user_ip6[3] = name->asked_ip.w[3];
    ctx->user_port = bpf_htons(name->asked_port);
    count(CNT_PEER_NAME, 1);
    return 1;
}
