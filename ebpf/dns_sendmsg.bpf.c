/* DNS capture, the sending side: cgroup/sendmsg4 for unconnected UDP, and
 * dns_connect4() which cgroup/connect4 calls for TCP and connected UDP. A
 * captured lookup goes to the DNS proxy on 127.0.0.1:15053 and its socket
 * remembers the server it asked (dns_origins), for recvmsg4 and getpeername4.
 * What is captured is what Istio's ISTIO_OUTPUT_DNS chain captures: port 53
 * to the listed servers (or any address), except the proxy's own lookups,
 * which its uid/gid RETURN rules let through before that chain. */
#include "merbridge.h"

static __always_inline int dns_from_proxy(struct dns_policy *p)
{
    __u64 uid_gid = bpf_get_current_uid_gid();
    return (__u32)uid_gid == p->proxy_uid || (__u32)(uid_gid >> 32) == p->proxy_gid;
}

static __always_inline int dns_server_captured(struct dns_policy *p, __u32 ip_net)
{
    if (p->flags & DNS_CAPTURE_ALL)
        return 1;
    for (int i = 0; i < MAX_DNS_SERVERS; i++) {
        if (i >= p->n_servers)
            break;
        if (p->servers[i] == ip_net)
            return 1;
    }
    return 0;
}

/* Whether a lookup to ip_net:port from this socket is one the pod's rules
 * capture; if so, the socket remembers the server (0), else -1. */
static __always_inline int dns_take(void *ctx, __u64 netns, __u32 ip_net, __u16 port)
{
    if (port != MB_DNS_PORT)
        return -1;
    struct dns_policy *p = dns_policy.lookup(&netns);
    if (!p || !dns_server_captured(p, ip_net))
        return -1;
    if (dns_from_proxy(p)) {
        dns_count(DNS_CNT_PROXY_SKIPPED);
        return -1;
    }
    __u64 cookie = socket_cookie64(ctx);
    struct dns_origin origin = {.ip = ip_net, .port = MB_DNS_PORT};
    if (dns_origins.update(&cookie, &origin) != 0) {
        /* without it the reply would come from 127.0.0.1 and be dropped */
        dns_count(DNS_CNT_ERR_MAP_UPDATE);
        return -1;
    }
    return 0;
}

/* Returns 1 when the destination was rewritten to the DNS proxy. */
static __always_inline int dns_redirect4(struct bpf_sock_addr *ctx, __u32 counter)
{
    if (dns_take(ctx, bpf_get_netns_cookie(ctx), ctx->user_ip4, bpf_ntohs((__u16)ctx->user_port)) != 0)
        return 0;
    ctx->user_ip4 = bpf_htonl(MB_DNS_PROXY_IP_HOST);
    ctx->user_port = bpf_htons(MB_DNS_PROXY_PORT);
    dns_count(counter);
    return 1;
}

static __always_inline int dns_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol == IPPROTO_TCP)
        return dns_redirect4(ctx, DNS_CNT_TCP_CONNECT);
    if (ctx->protocol == IPPROTO_UDP)
        return dns_redirect4(ctx, DNS_CNT_UDP_CONNECT);
    return 0;
}

/* Runs only for datagrams with an explicit destination (the kernel skips it
 * on connected sockets, which connect4 handled). */
int dns_sendmsg4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol == IPPROTO_UDP)
        dns_redirect4(ctx, DNS_CNT_UDP_SENDMSG);
    return 1;
}
