#!/usr/bin/env bash
# Lab PKI with openssl: a CA, a broker certificate for localhost/127.0.0.1,
# and client certificates signed from CSRs (e.g. one made inside the TPM by
# `tpmagent key csr`).
#
#   lab-pki.sh init DIR                  CA (ca.pem, ca.key) + server.pem/server.key
#   lab-pki.sh sign DIR CSR OUT [DAYS]   sign a client CSR into OUT
#   lab-pki.sh client DIR CN             software-key client cert (subscribers)
set -euo pipefail
cmd=${1:?usage: lab-pki.sh init|sign|client DIR ...}
dir=${2:?DIR}
mkdir -p "$dir"
ossl() { openssl "$@" 2>/dev/null; }

case "$cmd" in
init)
	if [ ! -f "$dir/ca.pem" ]; then
		ossl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key"
		chmod 600 "$dir/ca.key"
		ossl req -x509 -new -key "$dir/ca.key" -sha256 -days 3650 -subj "/O=tpmagent lab/CN=tpmagent lab CA" \
			-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$dir/ca.pem"
	fi
	if [ ! -f "$dir/server.pem" ]; then
		ossl ecparam -name prime256v1 -genkey -noout -out "$dir/server.key"
		ossl req -new -key "$dir/server.key" -subj "/CN=localhost" -out "$dir/server.csr"
		printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' > "$dir/server.ext"
		ossl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
			-days 365 -sha256 -extfile "$dir/server.ext" -out "$dir/server.pem"
		chmod 644 "$dir/server.key"
	fi
	echo "lab-pki: CA $dir/ca.pem, broker certificate $dir/server.pem"
	;;
sign)
	csr=${3:?CSR}
	out=${4:?OUT}
	days=${5:-30}
	openssl req -in "$csr" -verify -noout 2>/dev/null || { echo "lab-pki: $csr: CSR signature does not verify" >&2; exit 1; }
	printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n' > "$dir/client.ext"
	ossl x509 -req -in "$csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
		-days "$days" -sha256 -extfile "$dir/client.ext" -out "$out"
	echo "lab-pki: signed $out ($(openssl x509 -in "$out" -noout -subject))"
	;;
client)
	cn=${3:?CN}
	ossl ecparam -name prime256v1 -genkey -noout -out "$dir/$cn.key"
	ossl req -new -key "$dir/$cn.key" -subj "/CN=$cn" -out "$dir/$cn.csr"
	printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n' > "$dir/client.ext"
	ossl x509 -req -in "$dir/$cn.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
		-days 30 -sha256 -extfile "$dir/client.ext" -out "$dir/$cn.pem"
	;;
*)
	echo "usage: lab-pki.sh init|sign|client DIR ..." >&2
	exit 2
	;;
esac
