/* DNS capture, cgroup/getpeername4: a socket connected to the DNS proxy by
 * dns_connect4 (TCP or connected UDP) names the server the app asked as its
 * peer, as it would with Istio's REDIRECT rule (which leaves the socket's
 * own view of its peer alone). */
#include "merbridge.h"

int dns_getpeername4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != bpf_htonl(MB_DNS_PROXY_IP_HOST) || ctx->user_port != bpf_htons(MB_DNS_PROXY_PORT))
        return 1;
    __u64 cookie = socket_cookie64(ctx);
    struct dns_origin *origin = dns_origins.lookup(&cookie);
    if (!origin)
        return 1;
    ctx->user_ip4 = origin->ip;
    ctx->user_port = bpf_htons(origin->port);
    dns_count(DNS_CNT_PEER_NAME);
    return 1;
}
