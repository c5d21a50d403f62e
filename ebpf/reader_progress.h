#pragma once
/* What a spliced socket's reader took: shared by backpressure's two reader
 * hooks (tcp_bpf_recvmsg.bpf.c: fexit; sock_recv_length.bpf.c: a raw
 * tracepoint). The loader compiles this file with one of them.
 *
 * The receiving socket's own tuple comes from the head of its struct
 * sock_common, declared here rather than taken from the kernel's
 * <net/sock.h>: that header tripled the loader's compile time (CPU 1.4 s for
 * the main module, 2.7 s more for this one). Offsets checked in the BTF of
 * 6.1.192, 6.12.100, 6.12.118 and 6.18.44 (the same in all): skc_daddr 0,
 * skc_rcv_saddr 4, skc_dport 12, skc_num 14, skc_family 16, skc_v6_daddr 56,
 * skc_v6_rcv_saddr 72 (include/net/sock.h has kept this head for years). */
#include "merbridge.h"

struct sock;
struct msghdr;

struct sock_common_head {
    __be32 skc_daddr;
    __be32 skc_rcv_saddr;
    __u32 skc_hash;
    __be16 skc_dport;
    __u16 skc_num;               /* host order */
    __u16 skc_family;
    __u8 skc_state_and_flags[2];
    __s32 skc_bound_dev_if;
    __u64 skc_bind_node[2];
    __u64 skc_prot;
    __u64 skc_net;
    __u32 skc_v6_daddr[4];
    __u32 skc_v6_rcv_saddr[4];
};
_Static_assert(__builtin_offsetof(struct sock_common_head, skc_family) == 16, "sock_common head");
_Static_assert(__builtin_offsetof(struct sock_common_head, skc_v6_daddr) == 56, "sock_common head");
_Static_assert(__builtin_offsetof(struct sock_common_head, skc_v6_rcv_saddr) == 72, "sock_common head");

static __always_inline void reader_took(struct sock *sk, int flags, int copied)
{
    if (copied <= 0 || (flags & MSG_PEEK))
        return;
    struct sock_common_head head = {};
    if (bpf_probe_read_kernel(&head, sizeof(head), sk) != 0)
        return;
    struct sock_tuple t = {
        .local_port = head.skc_num,
        .remote_port = bpf_ntohs(head.skc_dport),   /* network order */
    };
    if (head.skc_family == AF_INET) {
        addr_set_v4(&t.local_ip, head.skc_rcv_saddr);
        addr_set_v4(&t.remote_ip, head.skc_daddr);
    } else if (head.skc_family == AF_INET6) {
        for (int i = 0; i < 4; i++) {
            t.local_ip.w[i] = head.skc_v6_rcv_saddr[i];
            t.remote_ip.w[i] = head.skc_v6_daddr[i];
        }
    } else {
        return;
    }
    struct sock_tuple *key = backlog_keys.lookup(&t);
    struct peer_backlog *b = peer_backlogs.lookup(key ? key : &t);
    if (b)
        __sync_fetch_and_add(&b->consumed, (__u64)copied);
}

