/* The minimal network stack of the x86 guest: ARP reply, ICMP echo reply, UDP echo
 * (port 7), with the same rules as pvio's Python NetStack (frontends/netstack.py): every
 * frame is hostile input; only frames for our MAC (or broadcast ARP) and our IPv4 address
 * are answered; the IPv4 header checksum, the ICMP checksum and a non-zero UDP checksum
 * must verify; fragments, options-bearing replies, group or unspecified sources are never
 * answered; Ethernet padding is trimmed with the IP total length.  Replies are staged on
 * the netfront TX ring (the caller pushes them). */
#include "pvio.h"

#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ECHO_PORT 7

struct netstack_stats ns_stats;
static u8 my_mac[6], my_ip[4];
static u16 ip_ident;
static u8 reply[65536];

static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8), p[1] = (u8)v; }

void netstack_init(const u8 mac[6], const u8 ip[4])
{
    memcpy(my_mac, mac, 6);
    memcpy(my_ip, ip, 4);
}

/* RFC 1071 ones' complement sum, folded; `initial` carries a pseudo-header's sum. */
u16 inet_checksum(const void *data, u32 len, u32 initial)
{
    const u8 *p = data;
    u64 sum = initial;
    for (; len > 1; p += 2, len -= 2)
        sum += (u32)(p[0] << 8 | p[1]);
    if (len)
        sum += (u32)p[0] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (u16)~sum;
}

static u32 pseudo_sum(const u8 *src, const u8 *dst, u32 len)
{
    return (u32)get16(src) + get16(src + 2) + get16(dst) + get16(dst + 2) + 17 + len;
}

static void send_reply(u32 len)
{
    if (nic->xmit(reply, len))
        ns_stats.reply_drops++;
}

static void arp(const u8 *f, u32 len)
{
    static const u8 fixed[6] = {0, 1, 8, 0, 6, 4}; /* Ethernet / IPv4 */
    if (len < 42 || memcmp(f + 14, fixed, 6)) {
        ns_stats.malformed++;
        return;
    }
    if (get16(f + 20) != 1 || memcmp(f + 38, my_ip, 4)) {
        ns_stats.ignored++;
        return;
    }
    if (f[22] & 1) {
        ns_stats.malformed++;
        return;
    }
    memcpy(reply, f + 22, 6); /* to the sender's hardware address */
    memcpy(reply + 6, my_mac, 6);
    put16(reply + 12, ETH_P_ARP);
    memcpy(reply + 14, fixed, 6);
    put16(reply + 20, 2);
    memcpy(reply + 22, my_mac, 6);
    memcpy(reply + 28, my_ip, 4);
    memcpy(reply + 32, f + 22, 10); /* target = the asker's sha + spa */
    ns_stats.arp_replies++;
    send_reply(42);
}

/* Ethernet + a 20-byte IPv4 header for a reply of `payload_len` bytes to (mac, ip). */
static void ip_header(const u8 *dst_mac, const u8 *dst_ip, u8 proto, u32 payload_len)
{
    memcpy(reply, dst_mac, 6);
    memcpy(reply + 6, my_mac, 6);
    put16(reply + 12, ETH_P_IP);
    u8 *ip = reply + 14;
    ip[0] = 0x45, ip[1] = 0;
    put16(ip + 2, (u16)(20 + payload_len));
    put16(ip + 4, ++ip_ident);
    put16(ip + 6, 0);
    ip[8] = 64, ip[9] = proto;
    put16(ip + 10, 0);
    memcpy(ip + 12, my_ip, 4);
    memcpy(ip + 16, dst_ip, 4);
    put16(ip + 10, inet_checksum(ip, 20, 0));
}

static void ipv4(const u8 *f, u32 len)
{
    if (len < 34) {
        ns_stats.malformed++;
        return;
    }
    const u8 *ip = f + 14;
    u32 ihl = (ip[0] & 0xF) * 4u, total = get16(ip + 2);
    if (ip[0] >> 4 != 4 || ihl < 20 || total < ihl || 14 + total > len || inet_checksum(ip, ihl, 0)) {
        ns_stats.malformed++;
        return;
    }
    if (memcmp(ip + 16, my_ip, 4) || (get16(ip + 6) & 0x3FFF) || ip[12] >= 224 ||
        !(ip[12] | ip[13] | ip[14] | ip[15])) {
        ns_stats.ignored++;
        return;
    }
    const u8 *src_ip = ip + 12, *l4 = ip + ihl;
    u32 l4len = total - ihl;
    if (l4len + 34 > sizeof reply) {
        ns_stats.ignored++;
        return;
    }
    if (ip[9] == 1) { /* ICMP */
        if (l4len < 8 || inet_checksum(l4, l4len, 0)) {
            ns_stats.malformed++;
            return;
        }
        if (l4[0] != 8 || l4[1] != 0) {
            ns_stats.ignored++;
            return;
        }
        ip_header(f + 6, src_ip, 1, l4len);
        u8 *icmp = reply + 34;
        memcpy(icmp, l4, l4len);
        icmp[0] = 0;
        put16(icmp + 2, 0);
        put16(icmp + 2, inet_checksum(icmp, l4len, 0));
        ns_stats.icmp_replies++;
        send_reply(34 + l4len);
    } else if (ip[9] == 17) { /* UDP */
        if (l4len < 8) {
            ns_stats.malformed++;
            return;
        }
        u32 ulen = get16(l4 + 4);
        if (ulen < 8 || ulen > l4len ||
            (get16(l4 + 6) && inet_checksum(l4, ulen, pseudo_sum(src_ip, my_ip, ulen)))) {
            ns_stats.malformed++;
            return;
        }
        if (get16(l4 + 2) != ECHO_PORT || get16(l4) == 0) {
            ns_stats.ignored++;
            return;
        }
        ip_header(f + 6, src_ip, 17, ulen);
        u8 *udp = reply + 34;
        put16(udp, ECHO_PORT);
        memcpy(udp + 2, l4, 2); /* to the sender's port */
        put16(udp + 4, (u16)ulen);
        put16(udp + 6, 0);
        memcpy(udp + 8, l4 + 8, ulen - 8);
        u16 sum = inet_checksum(udp, ulen, pseudo_sum(my_ip, src_ip, ulen));
        put16(udp + 6, sum ? sum : 0xFFFF);
        ns_stats.udp_replies++;
        send_reply(34 + ulen);
    } else {
        ns_stats.ignored++;
    }
}

void netstack_input(const u8 *f, u32 len)
{
    static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (len < 14) {
        ns_stats.malformed++;
        return;
    }
    int to_me = !memcmp(f, my_mac, 6);
    if ((!to_me && memcmp(f, bcast, 6)) || (f[6] & 1)) {
        ns_stats.ignored++;
        return;
    }
    u16 type = get16(f + 12);
    if (type == ETH_P_ARP)
        arp(f, len);
    else if (type == ETH_P_IP && to_me)
        ipv4(f, len);
    else
        ns_stats.ignored++;
}
