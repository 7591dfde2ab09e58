/* The emulated devices' register maps (docs/devices.md; the Python devices in
 * backends/emulated_nic.py and backends/smartnic.py are the definition, and
 * tests/test_x86_models.py checks every number here against them). */
#ifndef PVIO_DEVICES_H
#define PVIO_DEVICES_H

/* ------------------------------------------------------------------ emulated NIC */
#define EMUNIC_PIO_BASE 0xC000
#define EMUNIC_MMIO_BASE 0xFEB00000
#define EMUNIC_REG_CMD 0x00
#define EMUNIC_REG_STATUS 0x04
#define EMUNIC_REG_ISR 0x08
#define EMUNIC_REG_IMR 0x0C
#define EMUNIC_REG_TXLEN 0x10
#define EMUNIC_REG_TXDATA 0x14
#define EMUNIC_REG_RXLEN 0x18
#define EMUNIC_REG_RXDATA 0x1C
#define EMUNIC_REG_MAC_LO 0x20
#define EMUNIC_REG_MAC_HI 0x24
#define EMUNIC_REG_RXCOUNT 0x28
#define EMUNIC_REG_IRQ 0x2C
#define EMUNIC_CMD_RESET 0x01
#define EMUNIC_CMD_ENABLE 0x02
#define EMUNIC_CMD_TX 0x04
#define EMUNIC_CMD_RX_POP 0x08
#define EMUNIC_CMD_DISABLE 0x10
#define EMUNIC_ST_ENABLED 0x1
#define EMUNIC_ISR_ROK 0x01
#define EMUNIC_ISR_TOK 0x02
#define EMUNIC_ISR_RXOVW 0x04
#define EMUNIC_ISR_TER 0x08
#define EMUNIC_MAX_FRAME 1518

/* ------------------------------------------------------------------ smart NIC */
#define SNIC_MMIO_BASE 0xFEC00000
#define SNIC_ID 0x43494E53
#define SNIC_REG_ID 0x00
#define SNIC_REG_CTRL 0x08
#define SNIC_REG_STATUS 0x0C
#define SNIC_REG_TX_RING_LO 0x10
#define SNIC_REG_RX_RING_LO 0x18
#define SNIC_REG_POOL_LO 0x20
#define SNIC_REG_POOL_BUF_SIZE 0x28
#define SNIC_REG_POOL_COUNT 0x2C
#define SNIC_REG_IRQ 0x30
#define SNIC_REG_GRANT_DOMID 0x34
#define SNIC_REG_MAC_LO 0x38
#define SNIC_REG_MAC_HI 0x3C
#define SNIC_REG_DOORBELL 0x40
#define SNIC_REG_MOD_MODE 0x44
#define SNIC_REG_MOD_FRAMES 0x48
#define SNIC_REG_MOD_USECS 0x4C
#define SNIC_CTRL_ENABLE 0x1
#define SNIC_ST_ENABLED 0x1
#define SNIC_DB_TX 0x1
#define SNIC_DB_RX 0x2
#define SNIC_F_GREF 0x1
#define SNIC_RING_ENTRIES 128

struct snic_desc {   /* 16 bytes, written by the guest */
    u32 buf;         /* pool index, or a grant reference if flags & SNIC_F_GREF */
    u16 offset;      /* in the pool buffer or the granted page */
    u16 len;         /* TX: frame length; RX: room from offset */
    u16 id;          /* the driver's cookie, echoed in the completion */
    u16 flags;       /* SNIC_F_GREF; other bits 0 */
    u32 reserved;
};
struct snic_cmpl {   /* 8 bytes, written by the device: never trusted */
    u16 id;
    u16 len;
    s16 status;      /* 0 OK; -1 BAD_BUF, -2 BAD_GRANT, -3 BAD_LEN, -4 BAD_FLAGS */
    u16 flags;
};
_Static_assert(sizeof(struct snic_desc) == 16, "snic_desc is 16 bytes");
_Static_assert(sizeof(struct snic_cmpl) == 8, "snic_cmpl is 8 bytes");

/* ------------------------------------------------------------------ the bench harness */
#define VIRQ_BENCH 1 /* Xen's VIRQ_DEBUG: pvio's bench harness rings the guest with it */

#endif
