package pemfile

import "encoding/pem"

// CertificatesDER returns the DER bytes of every CERTIFICATE block in PEM
// data, in file order (a chain: leaf first), skipping other blocks.
func CertificatesDER(data []byte) [][]byte {
	var ders [][]byte
	for {
		var blk *pem.Block
		blk, data = pem.Decode(data)
		if blk == nil {
			return ders
		}
		if blk.Type == "CERTIFICATE" {
			ders = append(ders, blk.Bytes)
		}
	}
}
