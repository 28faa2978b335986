#!/bin/sh
# Regenerates the DEVELOPMENT-ONLY TLS material for the dev overlay's RabbitMQ.
# The key is committed on purpose: it protects nothing but a throwaway local cluster.
# Never reuse these files anywhere else.
set -eu
cd "$(dirname "$0")"
days=3650
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=sessiond DEV-ONLY test CA" -keyout ca.key -out ca.crt
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=rabbitmq" -keyout tls.key -out tls.csr
printf '%s\n' \
  "subjectAltName=DNS:rabbitmq,DNS:rabbitmq.default.svc,DNS:rabbitmq.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1" \
  "extendedKeyUsage=serverAuth" "keyUsage=digitalSignature,keyEncipherment" > san.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
  -extfile san.ext -out tls.crt
rm -f ca.key ca.srl tls.csr san.ext
chmod 0644 ca.crt tls.crt tls.key
