package spool
import ("os";"testing")
func TestMain(m *testing.M){ if os.Getenv("SPOOL_DEBUG")!="" { benchLogOut = os.Stderr }; os.Exit(m.Run()) }
