#!/bin/sh
# Build the hotsite appliance root filesystem: Debian 12 by debootstrap, the
# hotsite_appliance role applied inside it with Ansible's chroot connection,
# first-boot setup installed. Then (optional) a raw disk image from it.
#
#   images/build-rootfs.sh OUT_DIR WHEEL_DIR VARS_FILE [MIRROR]
#
# OUT_DIR/rootfs is the tree; VARS_FILE is YAML with hotsite_config (the
# appliance's config; hostname, addresses and secrets come at first boot).
# Needs root, debootstrap and ansible-core (the project's virtualenv has it).
set -eu
out=$1 wheels=$2 vars=$3 mirror=${4:-http://deb.debian.org/debian}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
root="$out/rootfs"
mkdir -p "$out"
if [ ! -x "$root/usr/bin/python3" ]; then
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-apt,systemd,systemd-sysv,udev,iproute2,openssh-server,ifupdown,ca-certificates,linux-image-amd64,grub-pc-bin \
        bookworm "$root" "$mirror"
fi
# Kernel filesystems for the role's tasks (apt, useradd); unmounted on exit.
for fs in proc sys dev; do mount --rbind "/$fs" "$root/$fs"; mount --make-rslave "$root/$fs"; done
trap 'for fs in dev sys proc; do umount -R "$root/$fs" 2>/dev/null || true; done' EXIT
inventory="$out/inventory.yml"
cat > "$inventory" <<INV
appliances:
  hosts:
    "$root":
      ansible_connection: chroot
      ansible_python_interpreter: /usr/bin/python3
      hotsite_wheel_dir: "$wheels"
INV
PATH="$repo/.venv/bin:$PATH" PYTHONPATH="$repo" \
ANSIBLE_ROLES_PATH="$repo/provisioning/ansible/roles" ANSIBLE_FILTER_PLUGINS="$repo/provisioning/ansible/filter_plugins" \
    ansible-playbook -i "$inventory" -e "@$vars" "$repo/provisioning/ansible/appliance.yml"
install -m 0755 "$here/firstboot/hotsite-firstboot" "$root/usr/local/sbin/hotsite-firstboot"
install -m 0644 "$here/firstboot/hotsite-firstboot.service" "$root/etc/systemd/system/hotsite-firstboot.service"
ln -sf /etc/systemd/system/hotsite-firstboot.service "$root/etc/systemd/system/multi-user.target.wants/hotsite-firstboot.service"
: > "$root/etc/machine-id"   # a fresh machine id per server, made at first boot
echo "rootfs ready: $root"
