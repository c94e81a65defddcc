// Command tpmagent is the device agent: TPM-resident identity, mTLS to MQTT
// brokers, durable high-rate telemetry, sealed telemetry and signed firmware
// updates. This package only wires cobra commands to the library packages.
package main

import "os"

func main() { os.Exit(Main()) }
