#!/bin/sh
# Pack a root filesystem built by build-rootfs.sh into a bootable raw disk
# image (GPT, UEFI): an EFI system partition holding systemd-boot, the kernel
# and the initramfs, then the root ext4 partition.
#
#   images/build-disk.sh ROOTFS IMAGE
#
# No loop device and no mount: each filesystem is made in a file of its own
# (mkfs.vfat + mtools for the ESP, mkfs.ext4 -d for the root) and copied into
# the image at its partition's offset, so it builds in a container too.
# ROOTFS is changed only in /etc/fstab and /boot/efi (its mount point).
# Needs sfdisk (fdisk), mkfs.vfat (dosfstools), mtools, mkfs.ext4 >= 1.43.
# Sizes (MiB) from the environment: ESP_MIB (256), ROOT_FREE_MIB (512):
# free space left in the root filesystem; the first boot grows it to the disk.
set -eu
root=$1 img=$2
esp_mib=${ESP_MIB:-256} root_free_mib=${ROOT_FREE_MIB:-512}
for tool in sfdisk mkfs.vfat mmd mcopy mkfs.ext4; do
    command -v "$tool" >/dev/null || { echo "build-disk: $tool is missing (apt-get install fdisk dosfstools mtools e2fsprogs)" >&2; exit 1; }
done
efi="$root/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
[ -f "$efi" ] || { echo "build-disk: $efi is missing: the root needs systemd-boot-efi" >&2; exit 1; }
# The newest kernel of the root and its initramfs (the kernel package made it).
kver=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' | sed 's|.*/vmlinuz-||' | sort -V | tail -n 1)
[ -n "$kver" ] && [ -f "$root/boot/initrd.img-$kver" ] || {
    echo "build-disk: no kernel and initramfs in $root/boot (linux-image-amd64, initramfs-tools)" >&2; exit 1; }

# Partition ids chosen here, so the kernel command line and fstab can name them.
esp_uuid=$(cat /proc/sys/kernel/random/uuid)
root_uuid=$(cat /proc/sys/kernel/random/uuid)
mkdir -p "$root/boot/efi"
cat > "$root/etc/fstab" <<FSTAB
# Written by images/build-disk.sh: partitions by GPT id, whatever the disk is called.
PARTUUID=$root_uuid / ext4 errors=remount-ro 0 1
PARTUUID=$esp_uuid /boot/efi vfat umask=0077 0 2
FSTAB

work=$(mktemp -d "${TMPDIR:-/tmp}/hotsite-disk.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The ESP (FAT32, readable by any laptop: the technician drops the first-boot
# file here). systemd-boot is the removable-media loader, so no NVRAM entry is needed.
mkfs.vfat -C -F 32 -n HOTSITE-EFI "$work/esp.img" $((esp_mib * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/hotsite
mcopy -i "$work/esp.img" "$efi" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$work/esp.img" "$root/boot/vmlinuz-$kver" ::/hotsite/vmlinuz
mcopy -i "$work/esp.img" "$root/boot/initrd.img-$kver" ::/hotsite/initrd.img
printf 'default hotsite.conf\ntimeout 3\nconsole-mode keep\n' > "$work/loader.conf"
# Kernel messages on the screen and the serial port (IPMI serial-over-LAN);
# ttyS0 last: systemd's status lines go there too. net.ifnames=0: the first
# NIC is eth0, what the first-boot file names by default.
cat > "$work/hotsite.conf" <<ENTRY
title   hotsite appliance (kernel $kver)
linux   /hotsite/vmlinuz
initrd  /hotsite/initrd.img
options root=PARTUUID=$root_uuid ro console=tty0 console=ttyS0,115200n8 net.ifnames=0
ENTRY
mcopy -i "$work/esp.img" "$work/loader.conf" ::/loader/loader.conf
mcopy -i "$work/esp.img" "$work/hotsite.conf" ::/loader/entries/hotsite.conf
mcopy -i "$work/esp.img" "$(dirname "$0")/firstboot/hotsite-firstboot.conf.example" ::/hotsite-firstboot.conf.example

# The root filesystem, populated straight from the directory (owners, modes,
# links and device nodes kept).
used_mib=$(du -s -m -x "$root" | cut -f1)
root_mib=$(( (used_mib * 12 / 10 + root_free_mib + 63) / 64 * 64 ))
mkfs.ext4 -q -L hotsite-root -d "$root" "$work/root.img" "${root_mib}M" >/dev/null

# The disk: 1 MiB for the GPT, the ESP, the root, 1 MiB for the backup GPT.
total_mib=$((1 + esp_mib + root_mib + 1))
rm -f "$img"
truncate -s "${total_mib}M" "$img"
sfdisk --quiet "$img" <<LAYOUT
label: gpt
unit: sectors
start=2048, size=$((esp_mib * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$esp_uuid, name="EFI system"
start=$(( (1 + esp_mib) * 2048 )), size=$((root_mib * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$root_uuid, name="hotsite-root"
LAYOUT
dd if="$work/esp.img" of="$img" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/root.img" of="$img" bs=1M seek=$((1 + esp_mib)) conv=notrunc,sparse status=none
if command -v bmaptool >/dev/null; then
    bmaptool -q create -o "$img.bmap" "$img"
fi
echo "disk image ready: $img (${total_mib} MiB; kernel $kver; root PARTUUID=$root_uuid)"
