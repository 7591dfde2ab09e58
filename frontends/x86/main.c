/* kmain: boot the pvio x86 guest kernel and run its application.
 *
 * Boot: find the hypercall page, shared_info, grant table and free memory from
 * start_info and pvio's extension, print the banner through console_io, register the
 * event callback, start the page allocator (after the image), the grant table and the
 * xenbus client, and enable events.  Then the command line (start_info.cmd_line, words
 * "key=value") chooses what runs:
 *
 *   ip=A.B.C.D           our IPv4 address (default 10.0.0.2)
 *   mode=echo            (default) answer ARP, ICMP echo and UDP echo on the vif
 *   mode=pktgen          send count= UDP frames of size= bytes (default 64) to
 *                        dst_mac= / dst_ip= (port dport=, default 9; source port 5000;
 *                        payload starts with the big-endian sequence number), after
 *                        the key /local/domain/<us>/data/pktgen-go exists when go=wait;
 *                        then answer like echo
 *   mode=badgrant        hostile: publish a tx-ring-ref that was never granted
 *   mode=badring         hostile: publish an impossible TX req_prod after connecting
 *   mode=badtxgrant      hostile: one TX request naming a grant that does not exist
 *   mode=fault-read | fault-ud | fault-stack | spin
 *                        a guest fault (NULL read, invalid opcode, unusable stack) or a
 *                        runaway loop, after the banner
 *   close=1              close the vif once the mode's work is done (pktgen: after
 *                        the last frame is answered): Closing, revoke every grant, Closed
 *   nic=pv|emulated|smartnic
 *                        the device model the network runs on (default pv: netfront);
 *                        emulated: emu_io=pio|mmio; smartnic: mod=, mod_frames=,
 *                        mod_usecs=, spin= (docs/devices.md)
 *   mode=bench           the bench harness's app (bench.c): a mailbox, commands by VIRQ
 *   mode=badreg          hostile (emulated NIC): a transmit of a bad length, a bad register
 *   mode=baddesc         hostile (smart NIC): a TX descriptor naming no pool buffer
 *   announce=0           do not send the self-addressed frame that teaches the switch
 *                        our MAC (default: send it once connected)
 */
#include "pvio.h"

struct start_info *start_info;
u64 hypercall_base, hypercall_iret;
extern char _end[];
extern void hypervisor_callback(void);

static unsigned domid;

static void echo_loop(void) __attribute__((noreturn));
static void echo_loop(void)
{
    for (;;) {
        if (nic->poll())
            continue;
        if (!nic->connected()) {
            wait_for_events(); /* the device is gone: idle, the guest stays up */
            continue;
        }
        nic->wait();
    }
}

static void wait_for_key(const char *path)
{
    char buf[16];
    xenbus_watch(path, "go");
    while (xenbus_read(0, path, buf, sizeof buf))
        xenbus_wait_watch("go");
    xenbus_unwatch(path, "go");
}

static void pktgen(void)
{
    char buf[64], path[96];
    u8 dst_mac[6], dst_ip[4], src_ip[4];
    u64 count = 1000, size = 64, dport = 9;
    if (!cmdline_get("dst_mac", buf, sizeof buf) || parse_mac(buf, dst_mac) ||
        !cmdline_get("dst_ip", buf, sizeof buf) || parse_ip(buf, dst_ip)) {
        printk("pktgen: needs dst_mac= and dst_ip=\n");
        return;
    }
    if (!cmdline_get("ip", buf, sizeof buf) || parse_ip(buf, src_ip))
        parse_ip("10.0.0.2", src_ip);
    if ((cmdline_get("count", buf, sizeof buf) && parse_u64(buf, &count)) ||
        (cmdline_get("size", buf, sizeof buf) && parse_u64(buf, &size)) ||
        (cmdline_get("dport", buf, sizeof buf) && parse_u64(buf, &dport)) || size < 46 || size > 1514 ||
        dport > 0xFFFF) {
        printk("pktgen: bad count=, size= or dport=\n");
        return;
    }
    if (cmdline_get("go", buf, sizeof buf) && !strcmp(buf, "wait")) {
        snprintf(path, sizeof path, "/local/domain/%u/data/pktgen-go", domid);
        wait_for_key(path);
    }
    /* The frame template: Ethernet, IPv4 (id 0, no options), UDP with checksum 0. */
    static u8 tmpl[1514];
    u32 len = (u32)size, ulen = len - 34;
    memcpy(tmpl, dst_mac, 6);
    memcpy(tmpl + 6, nic->mac(), 6);
    tmpl[12] = 0x08, tmpl[13] = 0x00;
    u8 *ip = tmpl + 14;
    ip[0] = 0x45, ip[2] = (u8)((len - 14) >> 8), ip[3] = (u8)(len - 14), ip[8] = 64, ip[9] = 17;
    memcpy(ip + 12, src_ip, 4);
    memcpy(ip + 16, dst_ip, 4);
    u16 csum = inet_checksum(ip, 20, 0);
    ip[10] = (u8)(csum >> 8), ip[11] = (u8)csum;
    u8 *udp = tmpl + 34;
    udp[0] = 5000 >> 8, udp[1] = 5000 & 0xFF, udp[2] = (u8)(dport >> 8), udp[3] = (u8)dport;
    udp[4] = (u8)(ulen >> 8), udp[5] = (u8)ulen;
    u64 sent = 0;
    if (nic != &netfront_ops) { /* the other drivers copy the frame into their own buffers */
        while (sent < count && nic->connected()) {
            u32 staged = 0;
            while (sent < count) {
                tmpl[42] = (u8)(sent >> 24), tmpl[43] = (u8)(sent >> 16);
                tmpl[44] = (u8)(sent >> 8), tmpl[45] = (u8)sent;
                if (nic->xmit(tmpl, len))
                    break;
                sent++, staged++;
            }
            nic->push();
            if (nic->poll())
                continue;
            if (!staged)
                nic->wait();
        }
        while (nic->tx_outstanding() && nic->connected()) {
            if (!nic->poll())
                nic->wait();
        }
    }
    while (nic == &netfront_ops && sent < count && netfront_connected()) {
        u32 staged = 0;
        u8 *buf_page;
        while (sent < count && (buf_page = netfront_tx_slot_buffer()) != NULL) {
            memcpy(buf_page, tmpl, len);
            buf_page[42] = (u8)(sent >> 24), buf_page[43] = (u8)(sent >> 16);
            buf_page[44] = (u8)(sent >> 8), buf_page[45] = (u8)sent;
            netfront_xmit_staged(len);
            sent++, staged++;
        }
        netfront_push();
        if (netfront_poll())
            continue;
        if (!staged && !netfront_final_check())
            wait_for_events();
    }
    while (nic == &netfront_ops && netfront_tx_outstanding() && netfront_connected()) {
        if (!netfront_poll() && !netfront_final_check())
            wait_for_events();
    }
    printk("pktgen: sent %lu frames of %lu bytes\n", sent, size);
}

static void fault(const char *mode)
{
    printk("fault mode %s: misbehaving now\n", mode);
    if (!strcmp(mode, "fault-read"))
    {
        u64 addr = 8; /* the NULL page is not mapped */
        __asm__ __volatile__("" : "+r"(addr));
        (void)*(volatile u64 *)addr;
    }
    else if (!strcmp(mode, "fault-ud"))
        __asm__ __volatile__("ud2");
    else if (!strcmp(mode, "fault-stack"))
        __asm__ __volatile__("xor %%esp, %%esp; push %%rax" ::: "memory");
    else
        for (;;)
            barrier();
}

void kmain(struct start_info *si)
{
    struct pvio_start_ext *ext = (struct pvio_start_ext *)((u8 *)si + PVIO_SI_EXT);
    start_info = si;
    if (memcmp(ext->magic, "PVIO", 4))
        __asm__ __volatile__("ud2"); /* no hypercall page to report it through */
    hypercall_base = ext->hypercall_gfn << PAGE_SHIFT;
    hypercall_iret = hypercall_base + HC_iret * 32;
    shared = (struct shared_info *)si->shared_info;
    domid = ext->domid;
    printk("pvio x86 guest kernel: dom%u, %lu pages, cmdline \"%s\"\n", domid, si->nr_pages, si->cmd_line);
    if (hypercall3(HC_set_callbacks, (u64)hypervisor_callback, 0, 0))
        panic("set_callbacks failed");
    u64 image_end = ((u64)_end + PAGE_SIZE - 1) >> PAGE_SHIFT;
    mm_init(image_end > ext->first_free_gfn ? image_end : ext->first_free_gfn, ext->free_end_gfn);
    gnttab_init(ext->gnttab_gfn, ext->gnttab_frames);
    xenbus_init(si->store_mfn << PAGE_SHIFT, si->store_evtchn);
    events_init();
    local_irq_enable();

    char mode[32], ipbuf[32];
    u8 ip[4];
    if (!cmdline_get("mode", mode, sizeof mode))
        strcpy_bounded(mode, "echo", sizeof mode);
    if (!strncmp(mode, "fault", 5) || !strcmp(mode, "spin"))
        fault(mode);
    if (!cmdline_get("ip", ipbuf, sizeof ipbuf) || parse_ip(ipbuf, ip))
        parse_ip("10.0.0.2", ip);
    if (cmdline_get("nic", ipbuf, sizeof ipbuf) && nic_select(ipbuf)) {
        printk("no such nic model: %s\n", ipbuf);
        for (;;)
            wait_for_events();
    }
    if (!strcmp(mode, "bench"))
        bench_init();
    if (nic->init(domid, !strcmp(mode, "bench") ? bench_rx : netstack_input, mode)) {
        printk("%s: no network (%s)\n", nic == &netfront_ops ? "netfront" : nic->name, nic->error());
        for (;;)
            wait_for_events();
    }
    netstack_init(nic->mac(), ip);
    if (!cmdline_get("announce", ipbuf, sizeof ipbuf) || strcmp(ipbuf, "0")) {
        u8 hello[60];
        memset(hello, 0, sizeof hello);
        memcpy(hello, nic->mac(), 6);
        memcpy(hello + 6, nic->mac(), 6);
        hello[12] = 0x88, hello[13] = 0xB5; /* local experimental: nobody answers */
        nic->xmit(hello, sizeof hello);
        nic->push();
    }
    printk("ready: %s, ip %u.%u.%u.%u\n", mode, ip[0], ip[1], ip[2], ip[3]);
    if (!strcmp(mode, "badring"))
        netfront_hostile_push(1000);
    else if (!strcmp(mode, "badtxgrant"))
        netfront_hostile_bad_tx_gref();
    else if (!strcmp(mode, "pktgen"))
        pktgen();
    else if (!strcmp(mode, "badreg") && nic == &emunic_ops)
        emunic_hostile_bad_registers();
    else if (!strcmp(mode, "baddesc") && nic == &snic_ops)
        snic_hostile_bad_descriptor();
    else if (!strcmp(mode, "bench"))
        bench_loop();
    if (cmdline_get("close", ipbuf, sizeof ipbuf) && !strcmp(ipbuf, "1") && nic == &netfront_ops)
        netfront_close();
    echo_loop();
}
