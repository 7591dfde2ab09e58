/* The NIC in use: cmd_line nic=pv (netfront, the default) | emulated | smartnic.  The
 * network stack, the echo loop, pktgen and the bench app only see struct nic_ops. */
#include "pvio.h"

static void netfront_wait(void)
{
    if (!netfront_final_check()) /* arm the event indices; sleep unless work appeared */
        wait_for_events();
}

const struct nic_ops netfront_ops = {
    .name = "pv",
    .init = netfront_init,
    .mac = netfront_mac,
    .connected = netfront_connected,
    .error = netfront_error,
    .xmit = netfront_xmit,
    .push = netfront_push,
    .poll = netfront_poll,
    .wait = netfront_wait,
    .tx_outstanding = netfront_tx_outstanding,
};

const struct nic_ops *nic = &netfront_ops;
struct nicdrv_stats drv_stats;

int nic_select(const char *name)
{
    static const struct nic_ops *const all[] = {&netfront_ops, &emunic_ops, &snic_ops};
    for (unsigned i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (!strcmp(name, all[i]->name)) {
            nic = all[i];
            return 0;
        }
    }
    return -EINVAL;
}
