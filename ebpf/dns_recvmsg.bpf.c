/* DNS capture, cgroup/recvmsg4: a reply the DNS proxy sent to a redirected
 * UDP socket is shown as coming from the server the app asked. glibc's
 * resolver (and dig, and most others) drop replies from any other address. */
#include "merbridge.h"

int dns_recvmsg4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != bpf_htonl(MB_DNS_PROXY_IP_HOST) || ctx->user_port != bpf_htons(MB_DNS_PROXY_PORT))
        return 1;
    __u64 cookie = socket_cookie64(ctx);
    struct dns_origin *origin = dns_origins.lookup(&cookie);
    if (!origin)
        return 1;   /* the app talks to the proxy's port itself */
    ctx->user_ip4 = origin->ip;
    ctx->user_port = bpf_htons(origin->port);
    dns_count(DNS_CNT_REPLY_SOURCE);
    return 1;
}
