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
 * earlier, redirected bytes) before its TCP receive queue, or (with the
 * stream verdict program of sk_skb.bpf.c) TCP bytes queue up behind them.
 * A switch is for good: a socket never goes back from TCP to redirects,
 * which would let later bytes overtake earlier ones.
 *
 * The receiver of TCP bytes stays in the sockhash: taking it out would drop
 * redirected bytes still waiting in its ingress queue (measured: the kernel
 * frees that queue with the socket's sockmap state). Whether its app then
 * sees the TCP bytes in FIONREAD depends on the kernel; the agent probes it
 * (merbridge_py/kernel_probes.py) and adds the stream verdict program or
 * does not splice at all (docs/kernel-behaviour.md). */
#include "merbridge.h"

/* 1 if this socket's sends must go through TCP from now on. */
static __always_inline int sending_bulk(struct send_state *st, __u32 size)
{
    struct datapath_config *cfg = datapath_config();
    if (!cfg || !cfg->bulk_bytes || !st)
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

/* ---- Backpressure (issue 20) ----------------------------------------------
 * A redirect puts bytes into the peer's ingress queue whatever its receive
 * buffer holds: a reader that stops reading would let a writer of any rate
 * (bulk detection only catches fast ones) fill kernel memory. So the bytes a
 * socket redirects are counted against its peer (peer_backlogs, keyed by the
 * peer's tuple), the bytes the peer's reader takes are counted by
 * tcp_bpf_recvmsg.bpf.c, and once the peer holds more than backlog_bytes
 * unread, this socket sends through TCP for good, as a bulk sender does: TCP's
 * flow control then holds the writer back, and byte order is kept for the
 * same reasons (see above). One message may overshoot the limit: a message is
 * never split. Without the tracing program (a kernel that refuses it) nothing
 * would ever be counted as read: the agent then either keeps the limit (every
 * spliced socket goes to TCP after backlog_bytes) or sets it to 0 and lowers
 * the bulk threshold instead (merbridge_py/datapath.py, BACKLOG_FALLBACK_ENV). */
static __always_inline int peer_backlog_full(struct send_state *st, const struct sock_tuple *peer)
{
    struct datapath_config *cfg = datapath_config();
    if (!cfg || !cfg->backlog_bytes || !st)
        return 0;
    if (st->backpressure)
        return 1;
    struct peer_backlog *b = peer_backlogs.lookup((struct sock_tuple *)peer);
    if (!b)
        return 0;
    __u64 redirected = b->redirected, consumed = b->consumed;
    /* consumed can pass redirected: a reader also reads bytes that came
     * through TCP (after this socket switched, or a miss), and those count too */
    if (consumed < redirected && redirected - consumed > cfg->backlog_bytes) {
        st->backpressure = 1;
        count(CNT_SPLICE_BACKPRESSURE, 1);
        return 1;
    }
    return 0;
}

static __always_inline void peer_backlog_add(const struct sock_tuple *peer, __u64 size)
{
    struct datapath_config *cfg = datapath_config();
    if (!cfg || !cfg->backlog_bytes)
        return;
    struct peer_backlog *b = peer_backlogs.lookup((struct sock_tuple *)peer);
    if (!b) {
        struct peer_backlog fresh = {.redirected = size};
        if (peer_backlogs.insert((struct sock_tuple *)peer, &fresh) == 0)
            return;
        b = peer_backlogs.lookup((struct sock_tuple *)peer);   /* inserted meanwhile by another sender */
        if (!b)
            return;
    }
    __sync_fetch_and_add(&b->redirected, size);
}
/* ---- end of backpressure ---- */

int sk_msg_splice(struct sk_msg_md *msg)
{
    __u64 size = msg->size;
    struct bpf_sock *sk = msg->sk;   /* read once: the verifier tracks the null check on this copy */
    struct send_state *st = sk ? send_states.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE) : 0;
    if (st && (st->missed || st->backpressure))
        return SK_PASS;
    if (sending_bulk(st, (__u32)size))
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
    if (peer_backlog_full(st, &peer))
        return SK_PASS;
    long verdict = sock_pairs.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (verdict == SK_PASS) {
        peer_backlog_add(&peer, size);
        if (st && st->redirected_msgs != 0xffffffff)
            st->redirected_msgs++;   /* adaptive splicing: what the connection did (sockops.bpf.c) */
        count(CNT_SPLICE_MSGS, 1);
        count(CNT_SPLICE_BYTES, size);
    } else {
        /* The peer is not in the sockhash (yet: it joins when its own end is
         * established, which can come after this end's first send). This
         * message goes through TCP into the peer's TCP receive queue; a later
         * one redirected into its ingress queue would be read first. So the
         * socket sends through TCP for good, like a bulk one: never drop data,
         * never reorder it. (Without socket storage, which only an
         * allocation failure leaves us, the switch cannot be remembered.) */
        if (st)
            st->missed = 1;
        count(CNT_SPLICE_MISS, 1);
    }
    return SK_PASS;
}
