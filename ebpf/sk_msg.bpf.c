/* sk_msg: hand each message of a spliced socket straight to its peer's
 * receive queue, skipping TCP/IP below the socket layer.
 *
 * A redirect into the peer's ingress queue never waits: the kernel charges the
 * bytes to the receiving socket and releases the sender's, so a writer faster
 * than its reader fills kernel memory until TCP memory pressure, and then its
 * writes fail with ENOMEM. TCP would have made it wait. So a socket that sends
 * more than bulk_bytes within bulk_window_ns is bulk: from then on its data
 * goes through TCP, with TCP's flow control. Switching from redirect to TCP
 * keeps the byte order, because the reader drains its ingress queue (all
 * earlier, redirected bytes) before its TCP receive queue. */
#include "merbridge.h"

/* 1 if this socket's sends must go through TCP from now on. */
static __always_inline int sending_bulk(struct sk_msg_md *msg, __u32 size)
{
    struct datapath_config *cfg = datapath_config();
    if (!cfg || !cfg->bulk_bytes || !msg->sk)
        return 0;
    struct send_state *st = send_states.sk_storage_get(msg->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!st)
        return 0;
    if (st->bulk)
        return 1;
    __u64 now = bpf_ktime_get_ns();
    if (now - st->window_start_ns > cfg->bulk_window_ns) {
        st->window_start_ns = now;
        st->window_bytes = 0;
    }
    st->window_bytes += size;
    if (st->window_bytes > cfg->bulk_bytes) {
        st->bulk = 1;
        count(CNT_SPLICE_BULK, 1);
        return 1;
    }
    return 0;
}

int sk_msg_splice(struct sk_msg_md *msg)
{
    __u64 size = msg->size;
    if (sending_bulk(msg, (__u32)size))
        return SK_PASS;
    /* The peer's own view of the connection: this socket's, halves swapped
     * (v4-mapped for IPv4 whatever the socket's family, as sockops keyed it). */
    struct sock_tuple peer = {
        .local_port = (__u16)bpf_ntohl(msg->remote_port),  /* network order, upper half */
        .remote_port = (__u16)msg->local_port,             /* host order */
    };
    int inet = msg->family == AF_INET;
    ADDR_FROM_CTX(&peer.local_ip, inet, msg, remote_ip4, remote_ip6);
    ADDR_FROM_CTX(&peer.remote_ip, inet, msg, local_ip4, local_ip6);
    long verdict = sock_pairs.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (verdict == SK_PASS) {
        count(CNT_SPLICE_MSGS, 1);
        count(CNT_SPLICE_BYTES, size);
    } else {
        count(CNT_SPLICE_MISS, 1);
    }
    /* On a miss the message goes through TCP as usual: never drop data. */
    return SK_PASS;
}
